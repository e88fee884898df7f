"""The chat-template engine: a small, sandboxed subset of Jinja written from scratch, rendering a model's chat
template exactly as jinja2 renders it when transformers configures it.

    lexer.py    template text -> tokens (text, {{ }}, {% %}, {# #}, whitespace control)
    parser.py   tokens -> the AST of nodes.py (statements and expressions)
    scopes.py   which names each block assigns (Jinja's frame scoping, macros included)
    values.py   Undefined, Markup, Namespace, loop objects, macros as values, the whitelisted methods, budgets
    filters.py  the filters, tests and globals a template may call
    render.py   the evaluator, the render budgets and the public functions below

What it implements: output, if/elif/else, for (with else, loop.*, filters, loop controls), set (also with
namespace(), block set and filtered block set), macros as Jinja defines them (positional and keyword arguments,
expression defaults, varargs/kwargs, macros calling macros and themselves, `{% call %}` blocks with caller(),
scoping: a macro sees the template's variables, not its caller's loop variables), `{% filter %}` blocks, calls
with *args/**kwargs, the expressions, filters (|format and |indent included) and tests the templates in
circulation use, and transformers' `{% generation %}` tag. Around the template it does what transformers'
render_jinja_template does: `tools`/`documents` default to None, any extra variable is passed through
(enable_thinking, reasoning_effort, builtin_tools, date_string...), and a message's reasoning_content is also
given as `thinking`. Measured on 2026-12-01: all 95 templates of ../shared/fixtures/chat_templates_wild render
character-equal to transformers on 22 conversation contexts (before macros: 69 of 95).

Budgets, which jinja2's sandbox does not have: a render stops with a ChatTemplateError naming the budget after
500,000 steps (statements, loop iterations, macro calls), 100 M characters written or held in one value, or 50
nested macro calls; `'a' * 10**10`, `2 ** 10**10` and huge format widths are refused before they allocate.
Nesting deep enough to overflow Python's stack, and 5,000-digit literals, are ChatTemplateErrors too.

What it refuses (a ChatTemplateError naming the construct and its line, never a silently different output):
include/import/extends/block, `{% with %}`, `{% do %}`, recursive loops, loop.changed, what transformers'
ImmutableSandboxedEnvironment refuses (list.append, dict.update and every other mutating method), and any
filter, test or method not listed in filters.py/values.py (e.g. str.format, list.index, |wordwrap, |groupby).
The rest of minilora imports only the names below.
"""

from .lexer import ChatTemplateError
from .render import render_chat_template, select_chat_template

__all__ = ["ChatTemplateError", "render_chat_template", "select_chat_template"]
