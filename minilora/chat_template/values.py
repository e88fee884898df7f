"""What template values are, and what a template may do with them: the sandbox of the chat-template engine.

Values are plain Python values (str, int, float, bool, None, list, tuple, dict) plus six small types:
`Undefined` (a missing variable, key or attribute, with jinja2's semantics), `Namespace` (`namespace()`, the one
mutable object), `LoopContext` (`loop.index`...), `Function` (the only things a template may call),
`MacroFunction` (a `{% macro %}` or `caller`) and `Markup` (a `|safe` or `|escape` result).

The output budget MAX_OUTPUT lives here too, with the checked `str.join`/`str.replace` that respect it.

`get_attr` and `get_item` are the only ways a template reaches into a value. They follow jinja2's sandboxed
rules (`x.key` reads a dict key unless a method of that name exists; a missing key or index is Undefined, not an
error) with one difference on purpose: only the methods in METHODS can be reached, and any other Python attribute
(`''.__class__`, `d.pop`, `x.real`) raises ChatTemplateError instead of being returned.
"""

from collections.abc import Iterator, Mapping
from functools import partial

from .lexer import ChatTemplateError

MAX_OUTPUT = 100_000_000  # the output budget: characters written per render, and the size of any one value


def refuse_large(size: int, what: str) -> None:
    """Stop before building a string or list larger than the output budget."""
    if size > MAX_OUTPUT:
        raise ChatTemplateError(f"output budget exceeded: {what} would be {size} characters or items, more than "
                                f"the {MAX_OUTPUT} allowed")


def checked_join(sep: str, items) -> str:
    """str.join, refused before it allocates more than the output budget (`|join` and `sep.join(...)`)."""
    items = list(items)
    if all(isinstance(item, str) for item in items):  # otherwise str.join raises its own TypeError
        refuse_large(len(sep) * max(len(items) - 1, 0) + sum(len(s) for s in items), "the joined string")
    return sep.join(items)


def checked_replace(s: str, old: str, new: str, count=-1) -> str:
    """str.replace, refused before it allocates more than the output budget (`|replace` and `s.replace(...)`)."""
    if isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        n = len(s) + 1 if old == "" else s.count(old)
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        refuse_large(len(s) + n * (len(new) - len(old)), "the replaced string")
    return s.replace(old, new, count)


class Undefined:
    """A missing variable, key or attribute (jinja2's default Undefined): "" when printed, falsy, empty when
    iterated, equal only to another Undefined; arithmetic, comparison, calls and attribute access fail."""

    __slots__ = ("hint",)

    def __init__(self, hint: str):
        self.hint = hint  # why it is undefined, for error messages: "'x' is undefined"

    def __str__(self):
        return ""

    def __len__(self):
        return 0

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __eq__(self, other):
        return type(other) is Undefined

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(Undefined)

    def __int__(self):  # so that |int fails loudly like jinja2 instead of returning its default
        raise ChatTemplateError(self.hint)

    __float__ = __getitem__ = __int__  # __getitem__ + __len__: reversed() works, and `is sequence` holds

    def __repr__(self):
        return "Undefined"


class Namespace:
    """`namespace(a=1)`: the only mutable object, so that a loop can carry state out (`{% set ns.a = 2 %}`)."""

    def __init__(self, attrs: dict):
        for key in attrs:
            check_public(key)
        self.attrs = dict(attrs)

    def __repr__(self):
        return f"<Namespace {self.attrs!r}>"


class LoopContext:
    """The `loop` variable of a for loop. Iterating it (`loop|list`) takes the loop's remaining items as
    (item, loop) pairs, which ends the loop early: jinja2's LoopContext does that too."""

    def __init__(self, items: list):
        self.items = items
        self.index0 = -1

    def advance(self) -> bool:
        """Move to the next item; False when there is none."""
        if self.index0 + 1 >= len(self.items):
            return False
        self.index0 += 1
        return True

    def __iter__(self):
        while self.advance():
            yield self.items[self.index0], self

    def get(self, name: str):
        i, n = self.index0, len(self.items)
        values = {
            "index0": i, "index": i + 1, "revindex0": n - i - 1, "revindex": n - i, "first": i == 0,
            "last": i == n - 1, "length": n, "depth": 1, "depth0": 0,
            "previtem": self.items[i - 1] if i > 0 else Undefined("there is no previous item"),
            "nextitem": self.items[i + 1] if i + 1 < n else Undefined("there is no next item"),
            "cycle": Function(lambda *args: args[i % len(args)], "loop.cycle"),
        }  # fmt: skip
        if name in values:
            return values[name]
        check_public(name)
        if name == "changed":
            raise ChatTemplateError("loop.changed is not supported")
        return Undefined(f"loop has no attribute {name!r}")

    def __repr__(self):
        return f"<LoopContext {self.index0 + 1}/{len(self.items)}>"


class Function:
    """A function a template may call: one of GLOBALS, `loop.cycle`, or a whitelisted method bound to a value."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn, name: str):
        self._fn, self._name = fn, name

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


class MacroFunction(Function):
    """A `{% macro %}` (or a call block's `caller`) as a value: calling it renders its body (see render.py)."""

    __slots__ = ()

    def __str__(self):  # what jinja2 prints for `{{ m }}` (a call block's caller has no name)
        return f"<Macro {'anonymous' if self._name is None else repr(self._name)}>"

    __repr__ = __str__  # inside a printed list or dict (`{{ kwargs }}`)


class Markup(str):
    """A string from `|safe` or `|escape` (jinja2's Markup): adding a plain string to it HTML-escapes that string."""


def check_public(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise ChatTemplateError(f"access to {name!r} is refused: templates cannot reach Python internals")


# Methods a template may call on values; called as `str.strip(value)` so a subclass cannot substitute its own.
METHODS = {
    str: {"strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "startswith", "endswith", "upper",
          "lower", "title", "capitalize", "replace", "find", "rfind", "count", "join", "isdigit", "isspace"},
    dict: {"items", "keys", "values", "get"},
    list: {"count"},
    tuple: {"count"},
}  # fmt: skip


_CHECKED_METHODS = {(str, "join"): checked_join, (str, "replace"): checked_replace}


def get_attr(obj, name: str):
    """`obj.name` with jinja2's rules: a (whitelisted) method of the value first, then a dict key, else Undefined."""
    if isinstance(obj, Undefined):
        raise ChatTemplateError(f"{obj.hint} (reading .{name})")
    if isinstance(obj, Namespace):
        check_public(name)
        return obj.attrs.get(name, Undefined(f"namespace has no attribute {name!r}"))
    if isinstance(obj, LoopContext):
        return obj.get(name)
    if isinstance(obj, Markup):
        raise ChatTemplateError(f".{name} on a |safe or |escape result is not supported")
    if not isinstance(obj, Mapping) or hasattr(type(obj), name):  # only plain dict keys may start with _
        check_public(name)
    for typ, names in METHODS.items():
        if isinstance(obj, typ) and name in names:
            method = _CHECKED_METHODS.get((typ, name), getattr(typ, name))
            return Function(partial(method, obj), f"{typ.__name__}.{name}")
    if hasattr(type(obj), name):  # some other Python attribute
        raise ChatTemplateError(f"{type(obj).__name__}.{name} is not supported by minilora's template engine")
    if isinstance(obj, Mapping) and name in obj:
        return obj[name]
    return Undefined(f"{_type_name(obj)} has no attribute {name!r}")


def get_item(obj, key):
    """`obj[key]` with jinja2's rules: a missing key/index is Undefined; a string key falls back to `obj.key`."""
    if isinstance(obj, Undefined):
        raise ChatTemplateError(f"{obj.hint} (reading [{key!r}])")
    if isinstance(obj, (Namespace, LoopContext)) and isinstance(key, str):
        return get_attr(obj, key)
    if isinstance(obj, Markup):
        raise ChatTemplateError("subscripting a |safe or |escape result is not supported")
    if isinstance(obj, (Mapping, list, tuple, str, range)):
        try:
            return obj[key]
        except (TypeError, LookupError):
            pass
    if isinstance(key, str) and not (isinstance(obj, Mapping) and key in obj):
        if any(isinstance(obj, typ) and key in names for typ, names in METHODS.items()) or hasattr(type(obj), key):
            return get_attr(obj, key)
    return Undefined(f"{_type_name(obj)} has no item {key!r}")


def _type_name(obj) -> str:
    return "None" if obj is None else f"{type(obj).__name__} object"


def to_str(value) -> str:
    """How `{{ value }}` prints: str() of the value, "" for Undefined (Python reprs inside lists, like jinja2)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Undefined):
        return ""
    if isinstance(value, Iterator):  # jinja2 would print "<generator object ...>"
        raise ChatTemplateError("cannot print a generator (a |map, |select... result): add |list or |join")
    if isinstance(value, MacroFunction):
        return str(value)
    if isinstance(value, Function):
        raise ChatTemplateError(f"cannot print the function {value._name}: call it")
    return str(value)
