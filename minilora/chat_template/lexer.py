"""Lexer of the chat-template engine: template text -> a flat list of tokens.

A Hugging Face chat template is a Jinja string. This module cuts it into
    text pieces          ("text")
    `{{ ... }}` tags     ("var_begin", expression tokens..., "var_end")
    `{% ... %}` tags     ("block_begin", expression tokens..., "block_end")
and drops `{# ... #}` comments. Expression tokens are "name", "string", "integer", "float" and "op".

Whitespace is handled here, exactly as jinja2's lexer does with the settings transformers uses
(`trim_blocks=True, lstrip_blocks=True`):
- `{%-`, `{{-`, `{#-` strip all whitespace before the tag; `-%}`, `-}}`, `-#}` all whitespace after it.
- trim_blocks: the first newline right after a `%}` or `#}` is removed (not after `}}`); `+%}` keeps it.
- lstrip_blocks: spaces/tabs between the start of a line and a `{%` or `{#` are removed (not before `{{`);
  `{%+` keeps them.
- `\\r\\n` and `\\r` become `\\n`, and one trailing newline at the end of the template is dropped.
String literals are unescaped like Python's (`'\\n'` is a newline), as jinja2 does.

Deliberately not handled: `{% raw %}` blocks, line statements (`# for ...`) and custom delimiters; a raw block
raises ChatTemplateError rather than being lexed wrongly.
"""

import re
from dataclasses import dataclass

from ..errors import MiniloraError


class ChatTemplateError(MiniloraError):
    """A chat template that cannot be rendered: a syntax error, an unsupported construct, a failing expression,
    or the template's own `raise_exception(...)`. `line` is the template line (1-based) when known."""

    def __init__(self, message: str, line: int | None = None):
        self.message, self.line = message, line
        super().__init__(f"chat template line {line}: {message}" if line else f"chat template: {message}")


@dataclass(frozen=True)
class Token:
    kind: str  # text, var_begin, var_end, block_begin, block_end, name, string, integer, float, op, eof
    value: object  # the text, the name, the unescaped string, the number or the operator
    line: int


# --- regular expressions (the same ones jinja2's lexer uses) ---
_TAG_START = re.compile(r"\{%(-|\+|)|\{\{(-|\+|)|\{#(-|\+|)")
_RAW_START = re.compile(r"\{%(-|\+|)\s*raw\s*(?:-%\}\s*|%\})")
_COMMENT_END = re.compile(r"(.*?)(\+#\}|-#\}\s*|#\}\n?)", re.S)  # trim_blocks: `#}` eats one newline
_BLOCK_END = re.compile(r"\+%\}|-%\}\s*|%\}\n?")  # trim_blocks: `%}` eats one newline
_VAR_END = re.compile(r"-\}\}\s*|\}\}")
_WHITESPACE = re.compile(r"\s+")
_FLOAT = re.compile(r"(?<!\.)(\d+_)*\d+((\.(\d+_)*\d+)?e[+\-]?(\d+_)*\d+|\.(\d+_)*\d+)", re.I)
_INTEGER = re.compile(r"0b(_?[0-1])+|0o(_?[0-7])+|0x(_?[\da-f])+|[1-9](_?\d)*|0(_?0)*", re.I)
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_STRING = re.compile(r"'([^'\\]*(?:\\.[^'\\]*)*)'|\"([^\"\\]*(?:\\.[^\"\\]*)*)\"", re.S)
_OPERATORS = ["//", "**", "==", "!=", ">=", "<="] + list("+-/*%~[](){}><=.:|,;")
_OPERATOR = re.compile("|".join(re.escape(op) for op in _OPERATORS))
_CLOSING = {"(": ")", "[": "]", "{": "}"}


def tokenize(source: str) -> list[Token]:
    """Split a template into tokens, applying whitespace control. Ends with an "eof" token."""
    lines = re.split(r"\r\n|\r|\n", source)
    if lines[-1] == "":  # jinja2's keep_trailing_newline=False
        lines.pop()
    source = "\n".join(lines)

    tokens: list[Token] = []
    pos, line = 0, 1
    line_starting = True  # did the previous token end a line? (lstrip_blocks also applies right after one)
    while pos < len(source):
        m = _TAG_START.search(source, pos)
        if m is None:
            tokens.append(Token("text", source[pos:], line))
            break
        if _RAW_START.match(source, m.start()):
            raise ChatTemplateError("{% raw %} blocks are not supported", line + source.count("\n", pos, m.start()))
        kind = "block" if m.group(1) is not None else "var" if m.group(2) is not None else "comment"
        sign = m.group(1) if kind == "block" else m.group(2) if kind == "var" else m.group(3)
        text = _strip_before_tag(source[pos : m.start()], kind, sign, line_starting)
        if text:
            tokens.append(Token("text", text, line))
        line += source.count("\n", pos, m.start())
        if kind == "comment":
            end = _COMMENT_END.match(source, m.end())
            if end is None:
                raise ChatTemplateError("missing end of comment tag '#}'", line)
        else:
            tokens.append(Token(f"{kind}_begin", sign, line))
            end = _lex_tag(source, m.end(), kind, line, tokens)
        line += source.count("\n", m.start(), end.end())
        line_starting = end.group().endswith("\n")
        pos = end.end()
    tokens.append(Token("eof", None, line))
    return tokens


def _strip_before_tag(text: str, kind: str, sign: str, line_starting: bool) -> str:
    """The text before a tag after `{%-` stripping or lstrip_blocks (jinja2's OptionalLStrip rule)."""
    if sign == "-":
        return text.rstrip()
    if sign == "+" or kind == "var":
        return text
    start_of_line = text.rfind("\n") + 1
    if (start_of_line > 0 or line_starting) and _WHITESPACE.fullmatch(text, start_of_line):
        return text[:start_of_line]
    return text


def _lex_tag(source: str, pos: int, kind: str, line: int, tokens: list[Token]) -> re.Match:
    """Append the expression tokens of one `{{ }}`/`{% %}` tag; return the match of its closing delimiter.

    A closing `}}` only counts outside brackets, so `{{ {'a': {'b': 1}} }}` and `{{ "}}" }}` lex correctly.
    """
    end_re = _BLOCK_END if kind == "block" else _VAR_END
    open_brackets: list[str] = []
    while pos < len(source):
        if not open_brackets and (end := end_re.match(source, pos)):
            tokens.append(Token(f"{kind}_end", None, line))
            return end
        if m := _WHITESPACE.match(source, pos):
            line += m.group().count("\n")
        elif m := _FLOAT.match(source, pos):
            tokens.append(Token("float", float(m.group().replace("_", "")), line))
        elif m := _INTEGER.match(source, pos):
            try:
                tokens.append(Token("integer", int(m.group().replace("_", ""), 0), line))
            except ValueError:  # Python refuses decimal literals past 4300 digits (jinja2 fails there too)
                raise ChatTemplateError(f"integer literal of {len(m.group())} digits is too long", line) from None
        elif m := _NAME.match(source, pos):
            tokens.append(Token("name", m.group(), line))
        elif m := _STRING.match(source, pos):
            tokens.append(Token("string", _unescape(m.group()[1:-1], line), line))
            line += m.group().count("\n")
        elif m := _OPERATOR.match(source, pos):
            op = m.group()
            if op in _CLOSING:
                open_brackets.append(_CLOSING[op])
            elif op in ")]}":
                if not open_brackets or open_brackets.pop() != op:
                    raise ChatTemplateError(f"unexpected {op!r}", line)
            tokens.append(Token("op", op, line))
        else:
            raise ChatTemplateError(f"unexpected character {source[pos]!r} inside a tag", line)
        pos = m.end()
    raise ChatTemplateError(f"unclosed {'{%' if kind == 'block' else '{{'} tag (end of template reached)", line)


def _unescape(body: str, line: int) -> str:
    """Backslash escapes in a string literal, with Python's rules (what jinja2 does)."""
    try:
        return body.encode("ascii", "backslashreplace").decode("unicode-escape")
    except UnicodeDecodeError as e:
        raise ChatTemplateError(f"bad escape in string literal: {e.reason}", line) from None
