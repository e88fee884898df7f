"""Filters (`x|trim`), tests (`x is defined`) and global functions of the chat-template engine.

Each follows jinja2's own definition (jinja2/filters.py, jinja2/tests.py, jinja2/defaults.py) as transformers
configures it: `tojson` is transformers' plain json.dumps (no HTML escaping), `raise_exception` and
`strftime_now` are transformers' globals, and `range` keeps the sandbox's 100000-item limit. Filters such as
`map`, `select`, `selectattr`, `unique` and `items` return one-shot generators, as in jinja2 (so
`|selectattr(...)|length` fails there too: templates write `|list|length`).

Not provided (ChatTemplateError when used): jinja2's other filters (wordwrap, groupby, batch, truncate, urlize,
xmlattr, random, ...), the globals lipsum/cycler/joiner, and most Markup behaviour (a |safe or |escape result
supports `+`, printing and the filters in MARKUP_SAFE_FILTERS).

Filters that could build a huge string in one step (`|indent(10**9)`, `|replace('', big)`, `|join` of many big
strings, `'%1000000000d'|format(1)`) check the output budget (values.MAX_OUTPUT) before they allocate.
"""

import datetime
import json
import math
import numbers
import operator
import re
from collections.abc import Mapping
from functools import partial

from .lexer import ChatTemplateError
from .values import (
    Function, Markup, Namespace, Undefined, checked_join, checked_replace, get_item, refuse_large, to_str,
)  # fmt: skip


_FORMAT_WIDTH = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\d+|\*)?(?:\.(\d+|\*))?")


def check_format_widths(fmt: str) -> None:
    """`'%1000000000d' % 1` allocates a gigabyte: refuse widths/precisions beyond the output budget."""
    for m in _FORMAT_WIDTH.finditer(fmt):
        for number in m.groups():
            if number == "*":
                raise ChatTemplateError("'*' widths in % formatting are not supported")
            if number is not None and len(number) > 8:
                refuse_large(int(number), "a % format width")


def soft_str(value) -> str:
    return value if isinstance(value, str) else to_str(value)


def escape(value) -> Markup:
    """HTML-escape like markupsafe (which jinja2's |escape uses even with autoescape off)."""
    if isinstance(value, Markup):
        return value
    s = soft_str(value)
    for char, entity in (("&", "&amp;"), (">", "&gt;"), ("<", "&lt;"), ("'", "&#39;"), ('"', "&#34;")):
        s = s.replace(char, entity)
    return Markup(s)


def attribute_getter(attribute, default=None):
    """jinja2's make_attrgetter: 'a.b.0' reads item['a']['b'][0]; None reads the item itself."""
    if attribute is None:
        parts = []
    elif isinstance(attribute, str):
        parts = [int(p) if p.isdigit() else p for p in attribute.split(".")]
    else:
        parts = [attribute]

    def getter(item):
        for part in parts:
            item = get_item(item, part)
            if default is not None and isinstance(item, Undefined):
                item = default
        return item

    return getter


def _lower_if_str(value):
    return value.lower() if isinstance(value, str) else value


def _first(seq):
    return next(iter(seq), Undefined("no first item, the sequence was empty"))


def _last(seq):
    return next(iter(reversed(seq)), Undefined("no last item, the sequence was empty"))


def _default(value, default_value="", boolean=False):
    return default_value if isinstance(value, Undefined) or (boolean and not value) else value


def _join(value, d="", attribute=None):
    if attribute is not None:
        value = map(attribute_getter(attribute), value)
    return checked_join(str(d), [soft_str(v) for v in value])


def _replace(s, old, new, count=None):
    return checked_replace(str(s), str(old), str(new), -1 if count is None else count)


def _indent(s, width=4, first=False, blank=False):
    """jinja2's do_indent: lines after the first (and blank lines only with blank=True) get `width` spaces or the
    string `width`; first=True indents the first line too."""
    if not isinstance(s, str):  # jinja2 appends "\n" to the value: a number or undefined fails there
        raise ChatTemplateError(f"|indent needs a string, got {type(s).__name__}")
    if isinstance(width, int):
        refuse_large(width, "the indentation")
    indention = width if isinstance(width, str) else " " * width
    s = soft_str(s) + "\n"  # jinja2's quirk for splitlines: a trailing newline is dropped, "" stays one line
    refuse_large(len(s) + len(indention) * (s.count("\n") + 1), "the indented string")
    if blank:
        rv = ("\n" + indention).join(s.splitlines())
    else:
        lines = s.splitlines()
        rv = lines.pop(0)
        if lines:
            rv += "\n" + "\n".join(indention + line if line else line for line in lines)
    return indention + rv if first else rv


def _format(value, *args, **kwargs):
    """jinja2's do_format: `"%s, %s"|format(a, b)` is `"%s, %s" % (a, b)`, or `% kwargs` with keywords."""
    if args and kwargs:
        raise ChatTemplateError("format: can't handle positional and keyword arguments at the same time")
    fmt = soft_str(value)
    check_format_widths(fmt)
    return fmt % (kwargs or args)


def _items(value):
    if isinstance(value, Undefined):
        return
    if not isinstance(value, Mapping):
        raise ChatTemplateError("|items needs a mapping")
    yield from value.items()


def _title(s):  # jinja2's own title(), not str.title(): "they're" -> "They're"
    return "".join(w[0].upper() + w[1:].lower() for w in re.split(r"([-\s({\[<]+)", soft_str(s)) if w)


def _int(value, default=0, base=10):
    try:
        return int(value, base) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        try:  # "42.23"|int is 42
            return int(float(value))
        except (TypeError, ValueError, OverflowError):
            return default


def _float(value, default=0.0):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _round(value, precision=0, method="common"):
    if method == "common":
        return round(value, precision)
    if method not in ("ceil", "floor"):
        raise ChatTemplateError("round method must be common, ceil or floor")
    return getattr(math, method)(value * 10**precision) / 10**precision


def _sort(value, reverse=False, case_sensitive=False, attribute=None):
    getters = [attribute_getter(a) for a in (attribute.split(",") if isinstance(attribute, str) else [attribute])]
    post = (lambda v: v) if case_sensitive else _lower_if_str
    return sorted(value, key=lambda item: [post(g(item)) for g in getters], reverse=reverse)


def _dictsort(value, case_sensitive=False, by="key", reverse=False):
    if by not in ("key", "value"):
        raise ChatTemplateError("dictsort: by must be 'key' or 'value'")
    if not isinstance(value, Mapping):  # jinja2 fails too (AttributeError: no .items())
        raise ChatTemplateError(f"|dictsort needs a mapping, got {type(value).__name__}")
    post = (lambda v: v) if case_sensitive else _lower_if_str
    return sorted(value.items(), key=lambda kv: post(kv[0 if by == "key" else 1]), reverse=reverse)


def _unique(value, case_sensitive=False, attribute=None):
    getter = attribute_getter(attribute)
    seen = set()
    for item in value:
        key = getter(item) if case_sensitive else _lower_if_str(getter(item))
        if key not in seen:
            seen.add(key)
            yield item


def _min_or_max(func, value, case_sensitive=False, attribute=None):
    items = list(value)
    if not items:
        return Undefined("no aggregated item, the sequence was empty")
    getter = attribute_getter(attribute)
    return func(items, key=lambda x: getter(x) if case_sensitive else _lower_if_str(getter(x)))


def _sum(value, attribute=None, start=0):
    return sum(map(attribute_getter(attribute), value) if attribute is not None else value, start)


def _reverse(value):
    if isinstance(value, str):
        return value[::-1]
    try:
        return reversed(value)
    except TypeError:
        return list(value)[::-1]


def _map(value, *args, **kwargs):
    if not args and "attribute" in kwargs:  # map(attribute='name', default=...)
        func = attribute_getter(kwargs.pop("attribute"), kwargs.pop("default", None))
        if kwargs:
            raise ChatTemplateError(f"map: unexpected argument {next(iter(kwargs))!r}")
    elif args:  # map('upper') or map('replace', 'a', 'b')
        name, rest = args[0], args[1:]
        func = lambda item: call_filter(name, item, rest, kwargs)  # noqa: E731
    else:
        raise ChatTemplateError("map needs a filter name or attribute=")
    if value:
        for item in value:
            yield func(item)


def _select_or_reject(keep: bool, by_attribute: bool, value, *args, **kwargs):
    """select/reject/selectattr/rejectattr: keep items whose (attribute) passes the test (truthiness if none)."""
    if by_attribute:
        if not args:
            raise ChatTemplateError("selectattr/rejectattr need an attribute name")
        getter, args = attribute_getter(args[0]), args[1:]
    else:
        getter = attribute_getter(None)
    if args:
        name, test_args = args[0], args[1:]
        check = lambda v: call_test(name, v, test_args, kwargs)  # noqa: E731
    else:
        check = bool
    if value:
        for item in value:
            if bool(check(getter(item))) == keep:
                yield item


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces jinja2's tojson (which HTML-escapes) by plain json.dumps with these options
    if isinstance(indent, (int, str)) and not isinstance(indent, bool):  # |tojson(indent=10**9): 4 GB of spaces
        width = len(indent) if isinstance(indent, str) else indent
        refuse_large(width * _json_indented_lines(x), "the indented JSON")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _json_indented_lines(x, depth: int = 1) -> int:
    """Sum of the nesting depths of the lines json.dumps(indent=...) writes: its indentation is width x that."""
    if isinstance(x, Mapping):
        return sum(depth + _json_indented_lines(v, depth + 1) for v in x.values()) + depth
    if isinstance(x, (list, tuple)):
        return sum(depth + _json_indented_lines(v, depth + 1) for v in x) + depth
    return 0


FILTERS = {
    "abs": abs, "capitalize": lambda s: soft_str(s).capitalize(), "count": len, "d": _default,
    "default": _default, "dictsort": _dictsort, "e": escape, "escape": escape, "first": _first,
    "float": _float, "format": _format, "indent": _indent, "int": _int, "items": _items, "join": _join,
    "last": _last, "length": len,
    "list": list, "lower": lambda s: soft_str(s).lower(), "map": _map, "max": partial(_min_or_max, max),
    "min": partial(_min_or_max, min), "reject": partial(_select_or_reject, False, False),
    "rejectattr": partial(_select_or_reject, False, True), "replace": _replace, "reverse": _reverse,
    "round": _round, "safe": lambda v: Markup(soft_str(v)), "select": partial(_select_or_reject, True, False),
    "selectattr": partial(_select_or_reject, True, True), "sort": _sort, "string": soft_str, "sum": _sum,
    "title": _title, "tojson": _tojson, "trim": lambda s, chars=None: soft_str(s).strip(chars),
    "unique": _unique, "upper": lambda s: soft_str(s).upper(),
}  # fmt: skip
# Filters whose result on a |safe/|escape string is the same with or without jinja2's Markup type
MARKUP_SAFE_FILTERS = {"safe", "e", "escape", "string", "length", "count", "default", "d", "tojson", "first",
                        "last", "list", "replace", "join", "int", "float", "sort"}  # fmt: skip


def call_filter(name: str, value, args, kwargs):
    if name not in FILTERS:
        raise ChatTemplateError(f"filter {name!r} is not supported by minilora's template engine")
    if isinstance(value, Markup) and name not in MARKUP_SAFE_FILTERS:
        raise ChatTemplateError(f"|{name} on a |safe or |escape result is not supported")
    return FILTERS[name](value, *args, **kwargs)


def _is_sequence(value) -> bool:
    try:
        len(value)
    except TypeError:
        return False
    return hasattr(type(value), "__getitem__")


def _is_iterable(value) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


TESTS = {
    "defined": lambda v: not isinstance(v, Undefined), "undefined": lambda v: isinstance(v, Undefined),
    "none": lambda v: v is None, "string": lambda v: isinstance(v, str),
    "mapping": lambda v: isinstance(v, Mapping), "iterable": _is_iterable, "sequence": _is_sequence,
    "number": lambda v: isinstance(v, numbers.Number),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool), "float": lambda v: isinstance(v, float),
    "boolean": lambda v: v is True or v is False, "true": lambda v: v is True, "false": lambda v: v is False,
    "even": lambda v: v % 2 == 0, "odd": lambda v: v % 2 == 1, "divisibleby": lambda v, n: v % n == 0,
    "lower": lambda v: str(v).islower(), "upper": lambda v: str(v).isupper(),
    "callable": lambda v: isinstance(v, (Function, Undefined)),  # jinja2's Undefined has a (failing) __call__
    "sameas": lambda v, other: v is other,
    "escaped": lambda v: isinstance(v, Markup), "in": lambda v, seq: v in seq,
    "filter": lambda v: v in FILTERS, "test": lambda v: v in TESTS,
    "==": operator.eq, "eq": operator.eq, "equalto": operator.eq, "!=": operator.ne, "ne": operator.ne,
    "<": operator.lt, "lt": operator.lt, "lessthan": operator.lt, "<=": operator.le, "le": operator.le,
    ">": operator.gt, "gt": operator.gt, "greaterthan": operator.gt, ">=": operator.ge, "ge": operator.ge,
}  # fmt: skip


def call_test(name: str, value, args, kwargs):
    if name not in TESTS:
        raise ChatTemplateError(f"test {name!r} is not supported by minilora's template engine")
    return TESTS[name](value, *args, **kwargs)


def _raise_exception(message):
    raise ChatTemplateError(str(message))


def _range(*args):
    r = range(*args)
    if len(r) > 100_000:  # jinja2's sandbox limit (MAX_RANGE)
        raise ChatTemplateError("range() longer than 100000 items")
    return r


def _namespace(*args, **kwargs):
    return Namespace(dict(*args, **kwargs))


def _unsupported(name: str) -> Function:
    def fail(*args, **kwargs):
        raise ChatTemplateError(f"the jinja2 global {name!r} is not supported")

    return Function(fail, name)


GLOBALS = {
    "raise_exception": Function(_raise_exception, "raise_exception"),
    "strftime_now": Function(lambda fmt: datetime.datetime.now().strftime(fmt), "strftime_now"),
    "namespace": Function(_namespace, "namespace"),
    "range": Function(_range, "range"),
    "dict": Function(dict, "dict"),
    "lipsum": _unsupported("lipsum"),
    "cycler": _unsupported("cycler"),
    "joiner": _unsupported("joiner"),
}
