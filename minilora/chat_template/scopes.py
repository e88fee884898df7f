"""Jinja's static scoping rule, computed once per template so the evaluator can match jinja2 exactly.

Jinja resolves variable names when it compiles a template, frame by frame. A frame is the template itself, one
iteration of a for loop body, a for loop's `{% else %}`, a `{% set x %}...{% endset %}` body, a macro's or call
block's body (its parameters bound), a `{% filter %}` body or a `{% generation %}` body; `{% if %}` branches
belong to the frame around them. Usually this behaves like plain
dynamic scoping: a name is looked up in the current frame, then the enclosing ones, then the render variables.
The evaluator does that with a ChainMap.

The exception, which this module finds: if the first mention of a name in a frame's own statements is an
unconditional `{% set name = ... %}` and no enclosing frame mentions the name, jinja2 binds it to *undefined* on
entering the frame, hiding any render variable of the same name until the set runs. A loop nested before the
set therefore sees undefined:

    {% for m in messages %}{{ y }}{% endfor %}{% set y = 1 %}     with y="ctx" renders "", not "ctx"

`annotate(template)` stores those names in `fresh` fields of the template and of each For/SetBlock/Scope node;
the evaluator binds them to undefined when it enters the frame. (Mirrors jinja2/idtracking.py: such names get
VAR_LOAD_UNDEFINED; names first loaded, or first stored inside an if, get VAR_LOAD_RESOLVE or an alias.)
"""

from dataclasses import fields, is_dataclass

import minilora.chat_template.nodes as nodes


def annotate(template: nodes.Template) -> None:
    """Fill `template.fresh` and the `*fresh` fields of every nested frame."""
    template.fresh = _frame(template.body, params=set(), outer=frozenset())


def _frame(body: list, params: set, outer: frozenset, first_loads=()) -> frozenset:
    """The names bound to undefined on entering this frame; annotates the frames nested in it.
    `first_loads`: expressions evaluated in the frame before its body (macro defaults, a block's filter)."""
    events: list[tuple[str, bool, bool]] = []  # (name, is_store, inside_an_if) in jinja's visiting order
    nested: list = []  # For/SetBlock/Scope/Macro/FilterBlock nodes whose bodies are frames of their own
    _loads(list(first_loads), events)
    _collect(body, events, nested, in_if=False)
    first: dict[str, tuple[bool, bool]] = {}
    for name, is_store, in_if in events:
        first.setdefault(name, (is_store, in_if))
    fresh = frozenset(
        name for name, (is_store, in_if) in first.items()
        if is_store and not in_if and name not in outer and name not in params
    )  # fmt: skip
    inner_outer = outer | params | first.keys()
    for node in nested:
        if isinstance(node, nodes.For):
            node.body_fresh = _frame(node.body, _target_names(node.target) | {"loop"}, inner_outer)
            node.else_fresh = _frame(node.else_body, set(), inner_outer)
        elif isinstance(node, nodes.Macro):
            params = {name for name, _ in node.params}
            params |= {n for n, on in zip(("varargs", "kwargs", "caller"),
                                          (node.catch_varargs, node.catch_kwargs, node.takes_caller)) if on}
            node.fresh = _frame(node.body, params, inner_outer, [d for _, d in node.params if d is not None])
        else:  # SetBlock, FilterBlock, Scope
            node.fresh = _frame(node.body, set(), inner_outer, [getattr(node, "filter", None)])
    return fresh


def _collect(body: list, events: list, nested: list, in_if: bool) -> None:
    """Record the loads and stores of one frame's own statements (not inside nested frames)."""
    for stmt in body:
        if isinstance(stmt, nodes.Output):
            _loads(stmt.expr, events)
        elif isinstance(stmt, nodes.If):
            for test, branch in stmt.branches:
                _loads(test, events)
                _collect(branch, events, nested, in_if=True)
            _collect(stmt.else_body, events, nested, in_if=True)
        elif isinstance(stmt, nodes.For):
            _loads(stmt.iter, events)  # the iterable is evaluated in the enclosing frame, the body is not
            nested.append(stmt)
        elif isinstance(stmt, nodes.Set):
            _loads(stmt.expr, events)  # `set y = y + 1` loads y before storing it
            _stores(stmt.target, events, in_if)
        elif isinstance(stmt, nodes.SetBlock):
            _stores(stmt.target, events, in_if)
            nested.append(stmt)
        elif isinstance(stmt, (nodes.Scope, nodes.FilterBlock)):
            nested.append(stmt)
        elif isinstance(stmt, nodes.Macro):  # defining a macro stores its name
            _stores(nodes.Name(stmt.name, stmt.line), events, in_if)
            nested.append(stmt)
        elif isinstance(stmt, nodes.CallBlock):  # the call is evaluated here, the caller body is a macro frame
            _loads(stmt.call, events)
            nested.append(stmt.caller)


def _loads(node, events: list) -> None:
    if isinstance(node, nodes.Name):
        events.append((node.name, False, False))
    elif is_dataclass(node):
        for f in fields(node):
            _loads(getattr(node, f.name), events)
    elif isinstance(node, (list, tuple)):
        for item in node:
            _loads(item, events)
    elif isinstance(node, dict):
        for item in node.values():
            _loads(item, events)


def _stores(target, events: list, in_if: bool) -> None:
    if isinstance(target, nodes.NSRef):  # `set ns.x = ...` reads ns
        events.append((target.name, False, False))
    elif isinstance(target, nodes.TupleLit):
        for item in target.items:
            _stores(item, events, in_if)
    else:
        events.append((target.name, True, in_if))


def _target_names(target) -> set:
    return {target.name} if isinstance(target, nodes.Name) else {item.name for item in target.items}
