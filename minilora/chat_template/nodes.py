"""The syntax tree of the chat-template engine: one small dataclass per Jinja construct.

template_parser builds these, template_scopes annotates the frames (For, SetBlock, Scope, Template) with the
names jinja2 binds to undefined on entry, and chat_template's evaluator walks them. Every node keeps the template
line it came from, for error messages. Expressions are immutable; the frame nodes carry their `*fresh` sets.
"""

from dataclasses import dataclass, field


# --- expressions ---
@dataclass(frozen=True)
class Const:
    value: object
    line: int


@dataclass(frozen=True)
class Name:
    name: str
    line: int


@dataclass(frozen=True)
class NSRef:  # `ns.attr` as an assignment target
    name: str
    attr: str
    line: int


@dataclass(frozen=True)
class ListLit:
    items: list
    line: int


@dataclass(frozen=True)
class TupleLit:
    items: list
    line: int


@dataclass(frozen=True)
class DictLit:
    pairs: list  # [(key expr, value expr)]
    line: int


@dataclass(frozen=True)
class GetAttr:  # obj.name
    obj: object
    name: str
    line: int


@dataclass(frozen=True)
class GetItem:  # obj[key], key may be a Slice
    obj: object
    key: object
    line: int


@dataclass(frozen=True)
class Slice:  # a:b:c inside [...]; missing parts are None
    start: object
    stop: object
    step: object
    line: int


@dataclass(frozen=True)
class Call:  # func(args, name=value, *dyn_args, **dyn_kwargs)
    func: object
    args: list
    kwargs: dict
    line: int
    dyn_args: object = None  # the expression after `*`, or None
    dyn_kwargs: object = None  # the expression after `**`, or None


@dataclass(frozen=True)
class Filter:  # value | name(args); value is None in a filter block's chain (the block's text goes there)
    value: object
    name: str
    args: list
    kwargs: dict
    line: int
    dyn_args: object = None
    dyn_kwargs: object = None


@dataclass(frozen=True)
class Test:  # value is name(args)
    value: object
    name: str
    args: list
    kwargs: dict
    line: int
    dyn_args: object = None
    dyn_kwargs: object = None


@dataclass(frozen=True)
class Unary:  # not x, -x, +x
    op: str
    operand: object
    line: int


@dataclass(frozen=True)
class Binary:  # and or + - * / // % **
    op: str
    left: object
    right: object
    line: int


@dataclass(frozen=True)
class Concat:  # a ~ b ~ c
    items: list
    line: int


@dataclass(frozen=True)
class Compare:  # a < b <= c (chained like Python); ops are (operator, expr), operator may be "in"/"notin"
    left: object
    ops: list
    line: int


@dataclass(frozen=True)
class CondExpr:  # then if test else else_ (else_ may be None: the result is then undefined)
    test: object
    then: object
    else_: object
    line: int


# --- statements ---
@dataclass(frozen=True)
class Text:
    text: str
    line: int


@dataclass(frozen=True)
class Output:  # {{ expr }}
    expr: object
    line: int


@dataclass(frozen=True)
class If:
    branches: list  # [(test, body)] for if and each elif
    else_body: list
    line: int


@dataclass
class For:
    target: object  # Name or TupleLit of Names
    iter: object
    filter: object  # the `if` of `for x in xs if cond`, or None
    body: list
    else_body: list
    line: int
    body_fresh: frozenset = frozenset()  # names bound to undefined when entering the body (template_scopes)
    else_fresh: frozenset = frozenset()


@dataclass(frozen=True)
class Set:
    target: object  # Name, NSRef or TupleLit of them
    expr: object
    line: int


@dataclass
class SetBlock:  # {% set x %}body{% endset %} or {% set x | filter %}body{% endset %}
    target: object
    body: list
    line: int
    filter: object = None  # a Filter chain whose innermost value is None, or None
    fresh: frozenset = frozenset()


@dataclass
class Macro:  # {% macro name(a, b=default) %}body{% endmacro %}; also the body of a {% call %} block (name "caller")
    name: str
    params: list  # [(name, default expression or None)]
    body: list
    line: int
    catch_varargs: bool = False  # the body mentions `varargs` / `kwargs` / `caller` (jinja2 decides so, statically)
    catch_kwargs: bool = False
    takes_caller: bool = False
    fresh: frozenset = frozenset()


@dataclass
class CallBlock:  # {% call(params) func(args) %}body{% endcall %}: func is called with caller=<the body as a macro>
    call: object  # a Call node
    caller: Macro
    line: int


@dataclass
class FilterBlock:  # {% filter f(args)|g %}body{% endfilter %}
    filter: object  # a Filter chain whose innermost value is None
    body: list
    line: int
    fresh: frozenset = frozenset()


@dataclass
class Scope:  # a body rendered in its own scope ({% generation %})
    body: list
    line: int
    fresh: frozenset = frozenset()


@dataclass(frozen=True)
class Break:
    line: int


@dataclass(frozen=True)
class Continue:
    line: int


@dataclass
class Template:
    body: list
    # filter/test names used outside if-statements and inline ifs -> first line: jinja2 checks that these exist
    # before rendering; names used inside ifs are only checked if they are evaluated
    filters: dict = field(default_factory=dict)
    tests: dict = field(default_factory=dict)
    fresh: frozenset = frozenset()  # names bound to undefined when rendering starts (template_scopes)
