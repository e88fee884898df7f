"""The chat-template engine: a small, sandboxed subset of Jinja written from scratch, rendering a model's chat
template exactly as jinja2 renders it when transformers configures it.

    lexer.py    template text -> tokens (text, {{ }}, {% %}, {# #}, whitespace control)
    parser.py   tokens -> the AST of nodes.py (statements and expressions)
    scopes.py   which names each block assigns (Jinja's for-loop scoping)
    values.py   Undefined, Markup, Namespace, loop objects, the whitelisted str/dict methods
    filters.py  the filters, tests and globals a template may call
    render.py   the evaluator and the public functions below

What it implements: output, if/elif/else, for (with else, loop.*, filters, loop controls), set (also with
namespace() and block set), the expressions, filters and tests the chat templates of the supported families use,
and transformers' `{% generation %}` tag. What it refuses (a ChatTemplateError naming the construct and its
line, never a silently different output): macros and call blocks, include/import/extends, `{% do %}`,
`{% filter %}`, `{% with %}`, recursive loops, and any filter, test or method not listed in filters.py/values.py.
The rest of minilora imports only the names below.
"""

from .lexer import ChatTemplateError
from .render import render_chat_template, select_chat_template

__all__ = ["ChatTemplateError", "render_chat_template", "select_chat_template"]
