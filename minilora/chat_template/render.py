"""The renderer: the public functions and the evaluator that walks the template's AST.

Hugging Face models carry their chat format as a Jinja string (tokenizer_config.json's `chat_template`). This
module renders such strings with exactly the output of jinja2 as transformers configures it (`utils/
chat_template_utils.py`: an ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loopcontrols, a
`tojson` filter without HTML escaping, the globals `raise_exception` and `strftime_now`, and the
`{% generation %}` tag), so that fine-tuning sees the very text the model was trained to read.

    template text --lexer--> tokens --parser--> nodes (the AST) --scopes--> annotated AST
    annotated AST + messages --this file's evaluator (values, filters)--> string

This file holds the public functions and the evaluator, which walks the AST: statements append text to an output
list, expressions become Python values. Jinja semantics kept on purpose: `{% set %}` inside a for loop is local
to the iteration (namespace() objects carry state out), a missing variable is Undefined (prints "", is falsy)
and only fails when used in arithmetic, comparison or attribute access, `{% for %}...{% else %}` runs the else
unless an iteration reached the end of its body.

Sandbox: a template reads no file, imports nothing and sees only the values passed to it; it can call only the
globals and filters of filters.py and the str/dict methods whitelisted in values.py.

Macros are values (values.MacroFunction) whose call binds the arguments as jinja2's runtime.Macro does and renders
the body in a frame of the scope where the macro was defined (a closure), so a macro sees the template's variables
at call time, not its caller's loop variables. Budgets (MAX_STEPS, values.MAX_OUTPUT, MAX_MACRO_DEPTH) stop
runaway templates with a ChatTemplateError naming the budget.

Deliberately not supported (ChatTemplateError naming the construct and its line, never a silently different
output): include/import/extends, `{% do %}`, `{% with %}`, recursive loops and the jinja2 filters/tests/methods
not listed in filters.py/values.py. Known difference:
jinja2 evaluates all-literal expressions when it compiles, so `{{ none[:1] }}` prints "" there while minilora
raises (as jinja2 itself does for `{{ x[:1] }}` with x = none); and printing a function (`{{ d.get }}`) raises
here instead of printing a memory address.
"""

import operator
from collections import ChainMap
from collections.abc import Mapping
from functools import lru_cache

import minilora.chat_template.nodes as nodes
from .filters import FILTERS, GLOBALS, TESTS, call_filter, call_test, check_format_widths, escape
from .lexer import ChatTemplateError
from .parser import parse
from .scopes import annotate
from .values import (
    MAX_OUTPUT, Function, LoopContext, MacroFunction, Markup, Namespace, Undefined, check_public, get_attr, get_item,
    to_str,
)  # fmt: skip

__all__ = ["ChatTemplateError", "render_chat_template", "select_chat_template"]


def render_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = False,
    bos_token: str = "",
    eos_token: str = "",
    **extra,
) -> str:
    """Render a chat template for `messages` (a list of {"role": ..., "content": ...} dicts).

    `extra` becomes template variables too (e.g. `tools=[...]`, `enable_thinking=False`, `date_string="26 Jul
    2024"`). Like transformers (render_jinja_template), `tools` and `documents` are None when not given, and a
    message's reasoning (`reasoning_content`, else `thinking`, else `reasoning`) is passed as both
    `reasoning_content` and, unless the message has its own, `thinking` (gpt-oss and LFM2.5 read that one).
    """
    if not isinstance(template, str):
        raise ChatTemplateError(f"the template must be a string, got {type(template).__name__}")
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
        raise ChatTemplateError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
    context = {
        "tools": None,
        "documents": None,
        **extra,
        "messages": [_alias_reasoning(m) for m in messages],
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    out: list[str] = []
    try:
        parsed = _parse(template)
        _Renderer().run(parsed.body, ChainMap(dict.fromkeys(parsed.fresh, _MISSING), context, GLOBALS), out)
    except RecursionError:  # ~70 nested brackets in the parser (jinja2 overflows there too), or deep data
        raise ChatTemplateError("the template or its data nests too deeply (Python's recursion limit)") from None
    return "".join(out)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: Mapping) -> Mapping:
    """transformers' _alias_reasoning_fields, key order included (it shows in `message|tojson`)."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def select_chat_template(chat_template_field, name: str | None = None) -> str | None:
    """The template string from tokenizer_config.json's `chat_template` field.

    The field is a string, or a list of {"name": ..., "template": ...} (then `name` picks one, by default the one
    named "default"). None when the field is None and no name was asked for.
    """
    if chat_template_field is None and name is None:
        return None
    if isinstance(chat_template_field, str):
        templates = {"default": chat_template_field}
    elif isinstance(chat_template_field, list) and all(
        isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in chat_template_field
    ):
        templates = {t["name"]: t["template"] for t in chat_template_field}
    else:
        raise ChatTemplateError(
            "tokenizer_config.json 'chat_template' must be a string or a list of {'name': ..., 'template': ...}"
        )
    if (name or "default") not in templates:
        raise ChatTemplateError(
            f"no chat template named {name or 'default'!r}; available: {sorted(templates)} (pass one as name)"
        )
    return templates[name or "default"]


@lru_cache(maxsize=32)
def _parse(template: str) -> nodes.Template:
    """Parse once per template string, and reject unknown filters/tests up front as jinja2 does when it compiles
    (except inside if-statements and inline ifs, where both engines fail only if the filter is evaluated)."""
    parsed = parse(template)
    for names, table, kind in ((parsed.filters, FILTERS, "filter"), (parsed.tests, TESTS, "test")):
        for name, line in names.items():
            if name not in table:
                raise ChatTemplateError(f"{kind} {name!r} is not supported by minilora's template engine", line)
    annotate(parsed)
    return parsed


# ---------------------------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------------------------
class _BreakLoop(Exception):
    pass


class _ContinueLoop(Exception):
    pass


_MISSING = object()  # a name bound to "undefined" in a frame (see template_scopes), or not found at all
# become ChatTemplateError with the line (AttributeError: e.g. jinja2's own `5|dictsort` fails with one too)
_PYTHON_ERRORS = (TypeError, ValueError, LookupError, ArithmeticError, AttributeError)

# Budgets. jinja2's sandbox has none: a template from an untrusted repository could loop for hours
# (two nested range(100000) loops: 10^10 iterations) or build a 10 GB string ('a' * 10**10). Real templates stay
# far below: the largest render of the 95 wild templates x 20 conversations (tools included) took 579 steps and
# wrote 8,660 characters; a 1,000-turn conversation through Qwen3.5's template takes 13,518 steps.
MAX_STEPS = 500_000  # statements run + loop iterations + macro calls per render (1-2 s of work on a loaded CPU)
# MAX_OUTPUT (values.py): characters written (output, {% set %} and macro buffers), and the size of any one value
# nested macro calls (recursion). Each level costs ~10 Python frames here (~5 in jinja2), so Python's default limit
# of 1000 is reached near 95 levels (jinja2: ~195); 50 stays clear of it under a deep caller's stack, and is far
# above real use (Hermes' json_to_python_type recurses once per level of a tool's JSON schema).
MAX_MACRO_DEPTH = 50

_BINARY = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
    "%": operator.mod, "**": operator.pow,
}  # fmt: skip
_COMPARE = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "in": lambda a, b: a in b, "notin": lambda a, b: a not in b,
}  # fmt: skip


class _Renderer:
    """Executes statements (appending text to `out`) and evaluates expressions in a scope.

    A scope is a ChainMap: {% set %} writes into its first map; a for loop runs each iteration in a child map,
    so variables set inside a loop do not leak out (namespace() objects are the way out, as in Jinja). A new
    frame's map starts with its `fresh` names bound to _MISSING (undefined): see template_scopes.
    """

    def __init__(self):
        self.steps = 0
        self.written = 0
        self.depth = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ChatTemplateError(f"step budget exceeded: the template ran more than {MAX_STEPS} steps "
                                    "(statements, loop iterations, macro calls); is it looping forever?")

    def write(self, out: list, text: str) -> None:
        self.written += len(text)
        if self.written > MAX_OUTPUT:
            raise ChatTemplateError(f"output budget exceeded: the template wrote more than {MAX_OUTPUT} characters")
        out.append(text)

    # --- statements ---
    def run(self, body: list, scope: ChainMap, out: list) -> None:
        for node in body:
            self.steps += 1  # self.step(), inlined: this is the hottest line of a render
            if self.steps > MAX_STEPS:
                self.step()
            try:
                getattr(self, f"exec_{type(node).__name__}")(node, scope, out)
            except ChatTemplateError as e:
                raise e if e.line is not None else ChatTemplateError(e.message, node.line) from None
            except _PYTHON_ERRORS as e:
                raise ChatTemplateError(f"{type(e).__name__}: {e}", node.line) from None

    def exec_Text(self, node, scope, out):
        self.write(out, node.text)

    def exec_Output(self, node, scope, out):
        self.write(out, to_str(self.eval(node.expr, scope)))

    def exec_If(self, node, scope, out):
        for test, body in node.branches:
            if self.eval(test, scope):
                return self.run(body, scope, out)
        self.run(node.else_body, scope, out)

    def exec_For(self, node, scope, out):
        items = list(self.eval(node.iter, scope))
        if node.filter is not None:  # `for x in xs if cond`: filtered before the loop, so loop.length counts kept
            kept = []
            for item in items:
                self.step()
                if self.eval(node.filter, self.bind(node.target, item, scope)):
                    kept.append(item)
            items = kept
        loop = LoopContext(items)
        completed = False  # jinja2 runs {% else %} unless some iteration reached the end of the body
        while loop.advance():  # not a plain for: iterating `loop` inside the body consumes items, as in jinja2
            self.step()
            item = items[loop.index0]
            inner = self.bind(node.target, item, scope, node.body_fresh)
            inner["loop"] = loop
            try:
                self.run(node.body, inner, out)
                completed = True
            except _ContinueLoop:
                continue
            except _BreakLoop:
                break
        if not completed:
            self.run(node.else_body, scope.new_child(dict.fromkeys(node.else_fresh, _MISSING)), out)

    def bind(self, target, value, scope: ChainMap, fresh: frozenset = frozenset()) -> ChainMap:
        inner = scope.new_child(dict.fromkeys(fresh, _MISSING))
        self.assign(target, value, inner)
        return inner

    def exec_Set(self, node, scope, out):
        self.assign(node.target, self.eval(node.expr, scope), scope)

    def exec_SetBlock(self, node, scope, out):
        buffer: list[str] = []
        inner = scope.new_child(dict.fromkeys(node.fresh, _MISSING))
        self.run(node.body, inner, buffer)
        value = "".join(buffer)
        self.assign(node.target, value if node.filter is None else self.eval_Filter(node.filter, inner, value), scope)

    def exec_FilterBlock(self, node, scope, out):
        buffer: list[str] = []
        inner = scope.new_child(dict.fromkeys(node.fresh, _MISSING))
        self.run(node.body, inner, buffer)
        result = self.eval_Filter(node.filter, inner, "".join(buffer))
        if not isinstance(result, str):  # jinja2 writes the result unconverted, and joining the output then fails
            raise ChatTemplateError(f"a {{% filter %}} block must produce a string, got {type(result).__name__}")
        self.write(out, result)

    def exec_Macro(self, node, scope, out):
        scope[node.name] = MacroFunction(lambda *args, **kwargs: self.call_macro(node, scope, args, kwargs), node.name)

    def exec_CallBlock(self, node, scope, out):
        caller = MacroFunction(lambda *args, **kwargs: self.call_macro(node.caller, scope, args, kwargs), None)
        self.write(out, to_str(self.eval_Call(node.call, scope, caller=caller)))

    def call_macro(self, node: nodes.Macro, scope: ChainMap, args: tuple, kwargs: dict) -> str:
        """Bind the arguments like jinja2's runtime.Macro, then render the body in a frame of the scope where the
        macro was defined: it sees the template's variables, not those of the loop it is called from."""
        names = [name for name, _ in node.params]
        values = list(args[: len(names)])
        kwargs = dict(kwargs)
        if len(values) != len(names):
            found_caller = "caller" in names[len(values):]
            values += [kwargs.pop(name, _MISSING) for name in names[len(values):]]
        else:
            found_caller = "caller" in names
        inner = scope.new_child(dict.fromkeys(node.fresh, _MISSING))
        if node.takes_caller and not found_caller:
            caller = kwargs.pop("caller", None)
            inner["caller"] = Undefined("No caller defined") if caller is None else caller
        if node.catch_kwargs:
            inner["kwargs"] = kwargs
        elif kwargs:
            raise ChatTemplateError(f"macro {node.name!r} takes no keyword argument {next(iter(kwargs))!r}")
        if node.catch_varargs:
            inner["varargs"] = tuple(args[len(names):])
        elif len(args) > len(names):
            raise ChatTemplateError(f"macro {node.name!r} takes not more than {len(names)} argument(s)")
        for name, value in zip(names, values):
            if value is not _MISSING:
                inner[name] = value
        for (name, default), value in zip(node.params, values):  # defaults may read the arguments before them
            if value is _MISSING:
                missing = Undefined(f"parameter {name!r} was not provided")
                inner[name] = missing if default is None else self.eval(default, inner)
        self.step()
        if self.depth >= MAX_MACRO_DEPTH:
            raise ChatTemplateError(f"macro depth budget exceeded: macros nested more than {MAX_MACRO_DEPTH} "
                                    f"calls deep (does {node.name!r} recurse without end?)", node.line)
        self.depth += 1
        try:
            buffer: list[str] = []
            self.run(node.body, inner, buffer)
        finally:
            self.depth -= 1
        return "".join(buffer)

    def exec_Scope(self, node, scope, out):
        self.run(node.body, scope.new_child(dict.fromkeys(node.fresh, _MISSING)), out)

    def exec_Break(self, node, scope, out):
        raise _BreakLoop

    def exec_Continue(self, node, scope, out):
        raise _ContinueLoop

    def assign(self, target, value, scope: ChainMap) -> None:
        if isinstance(target, nodes.Name):
            scope[target.name] = value
        elif isinstance(target, nodes.NSRef):
            ns = self.eval(nodes.Name(target.name, target.line), scope)
            if not isinstance(ns, Namespace):
                raise ChatTemplateError(f"cannot set {target.name}.{target.attr}: {target.name} is not a namespace()")
            check_public(target.attr)
            ns.attrs[target.attr] = value
        else:  # a, b = value
            values = list(value)
            if len(values) != len(target.items):
                raise ChatTemplateError(f"cannot unpack {len(values)} values into {len(target.items)} names")
            for t, v in zip(target.items, values):
                self.assign(t, v, scope)

    # --- expressions ---
    def eval(self, node, scope: ChainMap):
        try:
            return getattr(self, f"eval_{type(node).__name__}")(node, scope)
        except ChatTemplateError as e:
            raise e if e.line is not None else ChatTemplateError(e.message, node.line) from None
        except _PYTHON_ERRORS as e:
            raise ChatTemplateError(f"{type(e).__name__}: {e}", node.line) from None

    def eval_Const(self, node, scope):
        return node.value

    def eval_Name(self, node, scope):
        value = scope.get(node.name, _MISSING)
        if value is _MISSING:
            return Undefined(f"{node.name!r} is undefined")
        return value

    def eval_ListLit(self, node, scope):
        return [self.eval(item, scope) for item in node.items]

    def eval_TupleLit(self, node, scope):
        return tuple(self.eval(item, scope) for item in node.items)

    def eval_DictLit(self, node, scope):
        return {self.eval(k, scope): self.eval(v, scope) for k, v in node.pairs}

    def eval_GetAttr(self, node, scope):
        return get_attr(self.eval(node.obj, scope), node.name)

    def eval_GetItem(self, node, scope):
        obj = self.eval(node.obj, scope)
        if not isinstance(node.key, nodes.Slice):
            return get_item(obj, self.eval(node.key, scope))
        parts = (node.key.start, node.key.stop, node.key.step)
        key = slice(*(None if p is None else self.eval(p, scope) for p in parts))
        if isinstance(obj, (Undefined, Markup)):
            return get_item(obj, key)  # raises
        return obj[key]  # jinja2 slices with plain Python: `none[1:]` is an error, not undefined

    def arguments(self, node, scope, caller=None) -> tuple[list, dict]:
        """The positional and keyword arguments of a Call/Filter/Test node, `*args` and `**kwargs` spread; a call
        block's caller goes between the keywords and `**kwargs`, where jinja2 puts it (it shows in kwargs' order)."""
        args = [self.eval(a, scope) for a in node.args]
        kwargs = {k: self.eval(v, scope) for k, v in node.kwargs.items()}
        if caller is not None:
            kwargs["caller"] = caller
        if node.dyn_args is not None:
            args += list(self.eval(node.dyn_args, scope))
        if node.dyn_kwargs is not None:
            more = self.eval(node.dyn_kwargs, scope)
            if not isinstance(more, (Mapping, Undefined)):
                raise ChatTemplateError(f"argument after ** must be a mapping, not {type(more).__name__}")
            for key, value in dict(more).items():
                if key in kwargs:
                    raise ChatTemplateError(f"got multiple values for keyword argument {key!r}")
                kwargs[key] = value
        return args, kwargs

    def eval_Call(self, node, scope, caller=None):
        func = self.eval(node.func, scope)
        if isinstance(func, Undefined):
            raise ChatTemplateError(f"{func.hint} (called as a function)")
        if not isinstance(func, Function):
            raise ChatTemplateError(f"a {type(func).__name__} value is not callable")
        args, kwargs = self.arguments(node, scope, caller)
        return _check_size(func(*args, **kwargs))

    def eval_Filter(self, node, scope, block_text=None):
        """`value|f(...)`; in a filter block's chain the innermost value is None and `block_text` goes there."""
        if node.value is None:
            value = block_text
        elif isinstance(node.value, nodes.Filter):
            value = self.eval_Filter(node.value, scope, block_text)
        else:
            value = self.eval(node.value, scope)
        args, kwargs = self.arguments(node, scope)
        return _check_size(call_filter(node.name, value, args, kwargs))

    def eval_Test(self, node, scope):
        value = self.eval(node.value, scope)
        args, kwargs = self.arguments(node, scope)
        return call_test(node.name, value, args, kwargs)

    def eval_Unary(self, node, scope):
        value = self.eval(node.operand, scope)
        if node.op == "not":
            return not value
        _check_operands(node.op, value)
        return -value if node.op == "-" else +value

    def eval_Binary(self, node, scope):
        left = self.eval(node.left, scope)
        if node.op == "and":  # Python semantics: the deciding operand is the result
            return self.eval(node.right, scope) if left else left
        if node.op == "or":
            return left if left else self.eval(node.right, scope)
        right = self.eval(node.right, scope)
        if not (node.op == "%" and type(left) is str):  # Python's str % x formats even an undefined x
            _check_operands(node.op, left, right)
        if node.op == "+" and (isinstance(left, Markup) or isinstance(right, Markup)):
            if isinstance(left, str) and isinstance(right, str):  # jinja2's Markup escapes the plain operand
                return _check_size(Markup(escape(left) + escape(right)))
        _check_cost(node.op, left, right)
        return _check_size(_BINARY[node.op](left, right))

    def eval_Concat(self, node, scope):
        return _check_size("".join(to_str(self.eval(item, scope)) for item in node.items))

    def eval_Compare(self, node, scope):
        left = self.eval(node.left, scope)
        for op, right_node in node.ops:  # chained like Python: a < b < c stops at the first false
            right = self.eval(right_node, scope)
            if op in ("<", "<=", ">", ">="):
                _check_operands(op, left, right)
            if not _COMPARE[op](left, right):
                return False
            left = right
        return True

    def eval_CondExpr(self, node, scope):
        if self.eval(node.test, scope):
            return self.eval(node.then, scope)
        if node.else_ is None:
            return Undefined("the inline if-expression evaluated to false and has no else")
        return self.eval(node.else_, scope)


def _check_size(value):
    """A string or list result larger than the output budget stops the render (checked after each operation
    that can grow one; _check_cost refuses the ones that would allocate far more in a single step)."""
    limit = MAX_OUTPUT if isinstance(value, str) else MAX_OUTPUT // 10  # a list item costs 8+ bytes, a char 1-4
    if isinstance(value, (str, list, tuple)) and len(value) > limit:
        raise ChatTemplateError(f"output budget exceeded: a value of {len(value)} items or characters is larger "
                                f"than the {limit} allowed")
    return value


def _check_cost(op: str, left, right) -> None:
    """Refuse `'a' * 10**10` and `2 ** 10**10` before Python allocates or computes them."""
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            limit = MAX_OUTPUT if isinstance(seq, str) else MAX_OUTPUT // 10
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                raise ChatTemplateError(f"output budget exceeded: a sequence of {len(seq)} repeated {n} times is "
                                        f"larger than the {limit} allowed")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * abs(left).bit_length() > 1_000_000:  # a million-bit integer: far past anything printable
            raise ChatTemplateError(f"{left} ** {right} is too large to compute")
    elif op == "%" and isinstance(left, str):
        check_format_widths(left)


def _check_operands(op: str, *values) -> None:
    for v in values:
        if isinstance(v, Undefined):
            raise ChatTemplateError(f"{v.hint} (used with {op!r})")
        if isinstance(v, Markup) and op != "+":
            raise ChatTemplateError(f"{op!r} on a |safe or |escape result is not supported")
