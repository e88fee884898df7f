"""Parser of the chat-template engine: tokens -> a tree of small dataclasses (template_ast).

Recursive descent with jinja2's grammar and operator precedence, loosest first:
    x if c else y  <  or  <  and  <  not  <  == != < <= > >= in, not in  <  + -  <  ~  <  * / // %  <  **
    <  unary - +  <  filters `x|f(...)` and tests `x is t`  <  postfix `.attr` `[key]` `[a:b:c]` `(call)`
so `'a' + m['content'] | trim` is `'a' + (m['content'] | trim)`, and `not x is defined` is `not (x is defined)`.

Statements: if/elif/else, for (tuple targets, `for ... if ...` filter, `{% else %}`), set (`ns.attr` targets,
`{% set x %}...{% endset %}` blocks, also filtered: `{% set x | trim %}`), macro (positional and keyword
parameters with expression defaults), call blocks (`{% call(args) m() %}` with caller()), filter blocks,
break/continue (jinja2's loopcontrols) and transformers' `{% generation %}`. Calls, filters and tests take
`*args` and `**kwargs`, in jinja2's order (positional, keyword, *args, **kwargs).

Deliberately not handled (ChatTemplateError naming the construct and its line, at parse time):
with, include/import/extends/block, do (transformers does not enable the extension: jinja2 fails there too),
autoescape, recursive loops.
"""

from .nodes import (
    Binary, Break, Call, CallBlock, CondExpr, Compare, Concat, Const, Continue, DictLit, Filter, FilterBlock, For,
    GetAttr, GetItem, If, ListLit, Macro, Name, NSRef, Output, Scope, Set, SetBlock, Slice, Template, Test, Text,
    TupleLit, Unary,
)  # fmt: skip
from .lexer import ChatTemplateError, Token, tokenize


_UNSUPPORTED_TAGS = {
    "with", "include", "import", "from", "extends", "block", "do", "autoescape", "trans", "pluralize",
}  # fmt: skip
_MACRO_SPECIAL = ("varargs", "kwargs", "caller")
_COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=")


def parse(source: str) -> Template:
    """Parse a template string into a Template (its statement list plus the filter/test names it uses)."""
    return _Parser(tokenize(source)).parse()


class _Parser:
    def __init__(self, tokens: list[Token]):
        self.tokens = tokens
        self.pos = 0
        self.loop_depth = 0  # break/continue are only valid inside a for loop
        self.soft = False  # inside an if statement or inline if, where jinja2 checks filter names lazily
        self.uses: list[list] = []  # [kind, name, line, soft] of each filter and test, in parse order
        self.template = Template(body=[])

    # --- token helpers ---
    @property
    def cur(self) -> Token:
        return self.tokens[self.pos]

    def peek(self) -> Token:
        return self.tokens[min(self.pos + 1, len(self.tokens) - 1)]

    def advance(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def at(self, kind: str, value: object = None) -> bool:
        return self.cur.kind == kind and (value is None or self.cur.value == value)

    def skip(self, kind: str, value: object = None) -> bool:
        if self.at(kind, value):
            self.pos += 1
            return True
        return False

    def expect(self, kind: str, value: object = None) -> Token:
        if not self.at(kind, value):
            want = repr(value) if value is not None else {"block_end": "'%}'", "var_end": "'}}'"}.get(kind, kind)
            raise ChatTemplateError(f"expected {want}, got {_describe(self.cur)}", self.cur.line)
        return self.advance()

    # --- statements ---
    def parse(self) -> Template:
        self.template.body, _ = self.body(())
        for kind, name, line, soft in self.uses:
            if not soft:
                getattr(self.template, kind).setdefault(name, line)
        return self.template

    def frame_body(self, end_tags: tuple, soft: bool = False) -> tuple[list, str | None]:
        """A body that jinja2 compiles as its own frame (loop, set block) or as a soft one (if)."""
        outer, self.soft = self.soft, soft
        try:
            return self.body(end_tags)
        finally:
            self.soft = outer

    def body(self, end_tags: tuple) -> tuple[list, str | None]:
        """Statements up to one of `end_tags` (a `{% name` whose name is consumed and returned)."""
        nodes = []
        while True:
            tok = self.advance()
            if tok.kind == "eof":
                if end_tags:
                    end = next(t for t in end_tags if t.startswith("end"))  # for's ("endfor", "else") names endfor
                    raise ChatTemplateError(f"missing {{% {end} %}} (end of template reached)", tok.line)
                return nodes, None
            if tok.kind == "text":
                nodes.append(Text(tok.value, tok.line))
            elif tok.kind == "var_begin":
                nodes.append(Output(self.tuple_expr(), tok.line))
                self.expect("var_end")
            else:  # block_begin
                name = self.expect("name")
                if name.value in end_tags:
                    return nodes, name.value
                nodes.extend(self.statement(name))

    def statement(self, name: Token) -> list:
        tag, line = name.value, name.line
        if tag == "if":
            return [self.if_stmt(line)]
        if tag == "for":
            return [self.for_stmt(line)]
        if tag == "set":
            return [self.set_stmt(line)]
        if tag in ("break", "continue"):
            if not self.loop_depth:
                raise ChatTemplateError(f"{{% {tag} %}} outside a for loop", line)
            self.expect("block_end")
            return [Break(line) if tag == "break" else Continue(line)]
        if tag == "macro":
            return [self.macro_stmt(line)]
        if tag == "call":
            return [self.call_block(line)]
        if tag == "filter":
            chain = self.filter_chain(line)
            self.expect("block_end")
            body, _ = self.frame_body(("endfilter",))
            self.expect("block_end")
            return [FilterBlock(chain, body, line)]
        if tag == "generation":  # transformers' marker of assistant text: rendered as is
            self.expect("block_end")
            body, _ = self.frame_body(("endgeneration",))
            self.expect("block_end")
            return [Scope(body, line)]
        if tag in _UNSUPPORTED_TAGS:
            raise ChatTemplateError(f"{{% {tag} %}} is not supported by minilora's template engine", line)
        raise ChatTemplateError(f"unknown or misplaced tag {{% {tag} %}}", line)

    def if_stmt(self, line: int) -> If:
        branches, else_body = [], []
        outer, self.soft = self.soft, True
        while True:
            test = self.tuple_expr(with_condexpr=False)
            self.expect("block_end")
            body, end = self.frame_body(("elif", "else", "endif"), soft=True)
            branches.append((test, body))
            if end == "elif":
                continue
            if end == "else":
                self.expect("block_end")
                else_body, _ = self.frame_body(("endif",), soft=True)
            self.expect("block_end")
            self.soft = outer
            return If(branches, else_body, line)

    def for_stmt(self, line: int) -> For:
        target = self.assign_target(end_names=("in",), with_namespace=False)
        self.expect("name", "in")
        iterable = self.tuple_expr(with_condexpr=False, end_names=("recursive",))
        outer, self.soft = self.soft, False  # the loop filter is compiled in the loop's own frame
        cond = self.expression() if self.skip("name", "if") else None
        self.soft = outer
        if self.at("name", "recursive"):
            raise ChatTemplateError("recursive for loops are not supported", self.cur.line)
        self.expect("block_end")
        self.loop_depth += 1
        body, end = self.frame_body(("endfor", "else"))
        self.loop_depth -= 1
        else_body = []
        if end == "else":
            self.expect("block_end")
            else_body, _ = self.frame_body(("endfor",))
        self.expect("block_end")
        return For(target, iterable, cond, body, else_body, line)

    def set_stmt(self, line: int) -> Set | SetBlock:
        target = self.assign_target(end_names=(), with_namespace=True)
        if self.skip("op", "="):
            expr = self.tuple_expr()
            self.expect("block_end")
            return Set(target, expr, line)
        chain = self.filter_chain(line) if self.at("op", "|") else None
        self.expect("block_end")
        body, _ = self.frame_body(("endset",))
        self.expect("block_end")
        return SetBlock(target, body, line, chain)

    def filter_chain(self, line: int):
        """`f(args)|g` of a filter block or a filtered set block: a Filter chain applied to None (the body)."""
        self.skip("op", "|")
        node = None
        while True:
            tok = self.expect("name")
            name = self.dotted_name(tok.value)
            args, kwargs, dyn_args, dyn_kwargs = self.call_args() if self.at("op", "(") else ([], {}, None, None)
            self.uses.append(["filters", name, tok.line, self.soft])
            node = Filter(node, name, args, kwargs, tok.line, dyn_args, dyn_kwargs)
            if not self.skip("op", "|"):
                return node

    def macro_params(self) -> list:
        """`(a, b=default, ...)` of a macro or call block; a parameter without default may not follow one with."""
        params = []
        self.expect("op", "(")
        while not self.at("op", ")"):
            if params:
                self.expect("op", ",")
            tok = self.expect("name")
            default = self.expression() if self.skip("op", "=") else None
            if default is None and params and params[-1][1] is not None:
                raise ChatTemplateError("non-default argument follows default argument", tok.line)
            params.append((tok.value, default))
        self.expect("op", ")")
        return params

    def macro_stmt(self, line: int) -> Macro:
        name = self.expect("name").value
        params = self.macro_params()
        self.expect("block_end")
        outer_depth, self.loop_depth = self.loop_depth, 0  # a macro body is not inside the caller's loop
        body, _ = self.frame_body(("endmacro",))
        self.loop_depth = outer_depth
        self.expect("block_end")
        return _macro(name, params, body, line)

    def call_block(self, line: int) -> CallBlock:
        params = self.macro_params() if self.at("op", "(") else []
        call = self.expression()
        if not isinstance(call, Call):
            raise ChatTemplateError("expected a call after {% call %}", line)
        if "caller" in call.kwargs:  # the block is passed as caller=: Python (and so jinja2) refuses a second one
            raise ChatTemplateError("keyword argument repeated: caller", line)
        self.expect("block_end")
        outer_depth, self.loop_depth = self.loop_depth, 0
        body, _ = self.frame_body(("endcall",))
        self.loop_depth = outer_depth
        self.expect("block_end")
        return CallBlock(call, _macro("caller", params, body, line), line)

    def assign_target(self, end_names: tuple, with_namespace: bool):
        """`x`, `ns.x` (only with_namespace) or a tuple of them: `a, b`."""
        line = self.cur.line
        items, is_tuple = [], False
        while True:
            tok = self.expect("name")
            if tok.value in ("true", "false", "True", "False", "none", "None"):
                raise ChatTemplateError(f"cannot assign to {tok.value!r}", tok.line)
            if with_namespace and self.skip("op", "."):
                items.append(NSRef(tok.value, self.expect("name").value, tok.line))
            else:
                items.append(Name(tok.value, tok.line))
            if not self.skip("op", ","):
                break
            is_tuple = True
            if self.at_tuple_end(end_names) or self.at("op", "="):
                break
        return TupleLit(items, line) if is_tuple else items[0]

    # --- expressions (one method per precedence level, loosest first) ---
    def at_tuple_end(self, end_names: tuple = ()) -> bool:
        if self.cur.kind in ("var_end", "block_end") or self.at("op", ")"):
            return True
        return self.cur.kind == "name" and self.cur.value in end_names

    def tuple_expr(self, with_condexpr: bool = True, end_names: tuple = (), parenthesized: bool = False):
        """`a` or `a, b, ...` (a tuple); `()` only inside parentheses."""
        line = self.cur.line
        items, is_tuple = [], False
        while True:
            if items:
                self.expect("op", ",")
            if self.at_tuple_end(end_names):
                break
            items.append(self.expression(with_condexpr))
            if not self.at("op", ","):
                break
            is_tuple = True
        if not is_tuple:
            if items:
                return items[0]
            if not parenthesized:
                raise ChatTemplateError(f"expected an expression, got {_describe(self.cur)}", self.cur.line)
        return TupleLit(items, line)

    def expression(self, with_condexpr: bool = True):
        return self.cond_expr() if with_condexpr else self.or_expr()

    def cond_expr(self):
        line = self.cur.line
        first_use = len(self.uses)
        node = self.or_expr()
        while self.skip("name", "if"):
            for use in self.uses[first_use:]:  # `x|f if c else y`: the whole inline if is soft, x included
                use[3] = True
            outer, self.soft = self.soft, True
            test = self.or_expr()
            else_ = self.cond_expr() if self.skip("name", "else") else None
            self.soft = outer
            node = CondExpr(test, node, else_, line)
        return node

    def or_expr(self):
        node = self.and_expr()
        while self.at("name", "or"):
            line = self.advance().line
            node = Binary("or", node, self.and_expr(), line)
        return node

    def and_expr(self):
        node = self.not_expr()
        while self.at("name", "and"):
            line = self.advance().line
            node = Binary("and", node, self.not_expr(), line)
        return node

    def not_expr(self):
        if self.at("name", "not"):
            line = self.advance().line
            return Unary("not", self.not_expr(), line)
        return self.compare()

    def compare(self):
        line = self.cur.line
        left = self.math1()
        ops = []
        while True:
            if self.cur.kind == "op" and self.cur.value in _COMPARE_OPS:
                ops.append((self.advance().value, self.math1()))
            elif self.skip("name", "in"):
                ops.append(("in", self.math1()))
            elif self.at("name", "not") and self.peek().kind == "name" and self.peek().value == "in":
                self.pos += 2
                ops.append(("notin", self.math1()))
            else:
                break
        return Compare(left, ops, line) if ops else left

    def math1(self):  # + -
        node = self.concat()
        while self.cur.kind == "op" and self.cur.value in ("+", "-"):
            tok = self.advance()
            node = Binary(tok.value, node, self.concat(), tok.line)
        return node

    def concat(self):  # ~
        line = self.cur.line
        items = [self.math2()]
        while self.skip("op", "~"):
            items.append(self.math2())
        return items[0] if len(items) == 1 else Concat(items, line)

    def math2(self):  # * / // %
        node = self.power()
        while self.cur.kind == "op" and self.cur.value in ("*", "/", "//", "%"):
            tok = self.advance()
            node = Binary(tok.value, node, self.power(), tok.line)
        return node

    def power(self):  # **
        node = self.unary()
        while self.at("op", "**"):
            tok = self.advance()
            node = Binary("**", node, self.unary(), tok.line)
        return node

    def unary(self, with_filter: bool = True):
        """`-x`, `+x`, then postfix, then (only at the outer level) filters and tests: `-x|abs` is `(-x)|abs`."""
        if self.cur.kind == "op" and self.cur.value in ("-", "+"):
            tok = self.advance()
            node = Unary(tok.value, self.unary(with_filter=False), tok.line)
        else:
            node = self.primary()
        node = self.postfix(node)
        return self.filters_and_tests(node) if with_filter else node

    def primary(self):
        tok = self.advance()
        if tok.kind == "name":
            if tok.value in ("true", "True", "false", "False"):
                return Const(tok.value in ("true", "True"), tok.line)
            if tok.value in ("none", "None"):
                return Const(None, tok.line)
            return Name(tok.value, tok.line)
        if tok.kind == "string":  # adjacent literals concatenate: "a" "b" == "ab"
            parts = [tok.value]
            while self.at("string"):
                parts.append(self.advance().value)
            return Const("".join(parts), tok.line)
        if tok.kind in ("integer", "float"):
            return Const(tok.value, tok.line)
        if tok.kind == "op" and tok.value == "(":
            node = self.tuple_expr(parenthesized=True)
            self.expect("op", ")")
            return node
        if tok.kind == "op" and tok.value == "[":
            return ListLit(self.comma_list("]", self.expression), tok.line)
        if tok.kind == "op" and tok.value == "{":
            return DictLit(self.comma_list("}", self.dict_pair), tok.line)
        raise ChatTemplateError(f"unexpected {_describe(tok)}", tok.line)

    def comma_list(self, close: str, parse_item) -> list:
        """Items up to `close`, separated by commas; a trailing comma is allowed."""
        items = []
        while not self.at("op", close):
            if items:
                self.expect("op", ",")
                if self.at("op", close):
                    break
            items.append(parse_item())
        self.expect("op", close)
        return items

    def dict_pair(self) -> tuple:
        key = self.expression()
        self.expect("op", ":")
        return key, self.expression()

    def postfix(self, node):
        while True:
            if self.at("op", "."):
                line = self.advance().line
                tok = self.advance()
                if tok.kind == "name":
                    node = GetAttr(node, tok.value, line)
                elif tok.kind == "integer":  # x.0 is x[0]
                    node = GetItem(node, Const(tok.value, tok.line), line)
                else:
                    raise ChatTemplateError(f"expected a name after '.', got {_describe(tok)}", tok.line)
            elif self.at("op", "["):
                line = self.advance().line
                keys = self.comma_list("]", self.subscript)  # x[a, b] is x[(a, b)], and x[] is x[()]
                node = GetItem(node, keys[0] if len(keys) == 1 else TupleLit(keys, line), line)
            elif self.at("op", "("):
                node = self.call(node)
            else:
                return node

    def subscript(self):
        """`key` or a slice `start:stop:step` with any part left out."""
        line = self.cur.line
        parts = [None, None, None]
        if not self.at("op", ":"):
            parts[0] = self.expression()
            if not self.at("op", ":"):
                return parts[0]
        self.expect("op", ":")
        if not (self.at("op", ":") or self.at("op", "]") or self.at("op", ",")):
            parts[1] = self.expression()
        if self.skip("op", ":") and not (self.at("op", "]") or self.at("op", ",")):
            parts[2] = self.expression()
        return Slice(*parts, line)

    def call_args(self) -> tuple[list, dict, object, object]:
        """`(a, k=v, *rest, **more)`: positional, keyword, then at most one `*` and one `**` (jinja2's order)."""
        line = self.expect("op", "(").line
        args, kwargs, dyn_args, dyn_kwargs = [], {}, None, None
        first = True
        while not self.at("op", ")"):
            if not first:
                self.expect("op", ",")
                if self.at("op", ")"):
                    break
            first = False
            if self.skip("op", "*"):
                if dyn_args is not None or dyn_kwargs is not None:
                    raise ChatTemplateError("invalid syntax for function call expression", line)
                dyn_args = self.expression()
            elif self.skip("op", "**"):
                if dyn_kwargs is not None:
                    raise ChatTemplateError("invalid syntax for function call expression", line)
                dyn_kwargs = self.expression()
            elif self.cur.kind == "name" and self.peek().kind == "op" and self.peek().value == "=":
                if dyn_kwargs is not None:
                    raise ChatTemplateError("invalid syntax for function call expression", line)
                key = self.advance().value
                self.advance()
                kwargs[key] = self.expression()
            elif kwargs or dyn_args is not None or dyn_kwargs is not None:
                raise ChatTemplateError("invalid syntax for function call expression", line)
            else:
                args.append(self.expression())
        self.expect("op", ")")
        return args, kwargs, dyn_args, dyn_kwargs

    def call(self, node) -> Call:
        line = self.cur.line
        args, kwargs, dyn_args, dyn_kwargs = self.call_args()
        return Call(node, args, kwargs, line, dyn_args, dyn_kwargs)

    def filters_and_tests(self, node):
        while True:
            if self.skip("op", "|"):
                tok = self.expect("name")
                name = self.dotted_name(tok.value)
                args, kwargs, dyn_args, dyn_kwargs = self.call_args() if self.at("op", "(") else ([], {}, None, None)
                self.uses.append(["filters", name, tok.line, self.soft])
                node = Filter(node, name, args, kwargs, tok.line, dyn_args, dyn_kwargs)
            elif self.at("name", "is"):
                node = self.test(node)
            elif self.at("op", "("):
                node = self.call(node)
            else:
                return node

    def dotted_name(self, name: str) -> str:
        """Filter and test names may contain dots (jinja2 parses them; none is defined, so they fail later)."""
        while self.skip("op", "."):
            name += "." + self.expect("name").value
        return name

    def test(self, node):
        """`x is name`, `x is not name`, `x is name(args)` or `x is name arg` (one primary argument)."""
        line = self.advance().line
        negated = self.skip("name", "not")
        name = self.dotted_name(self.expect("name").value)
        args, kwargs, dyn_args, dyn_kwargs = [], {}, None, None
        if self.at("op", "("):
            args, kwargs, dyn_args, dyn_kwargs = self.call_args()
        elif self.cur.kind in ("name", "string", "integer", "float") or (
            self.cur.kind == "op" and self.cur.value in ("[", "{")
        ):
            if not (self.cur.kind == "name" and self.cur.value in ("else", "or", "and")):
                if self.at("name", "is"):
                    raise ChatTemplateError("tests cannot be chained with 'is'", line)
                args = [self.postfix(self.primary())]
        self.uses.append(["tests", name, line, self.soft])
        node = Test(node, name, args, kwargs, line, dyn_args, dyn_kwargs)
        return Unary("not", node, line) if negated else node


def _macro(name: str, params: list, body: list, line: int) -> Macro:
    """A Macro node; like jinja2, it takes varargs/kwargs/caller only if its body reads those names."""
    names = {p for p, _ in params}
    mentioned = _mentions(body, set(_MACRO_SPECIAL))
    if "caller" in mentioned and "caller" in names and dict(params)["caller"] is None:
        raise ChatTemplateError('the special "caller" argument must be omitted or be given a default', line)
    special = {n for n in mentioned if n not in names}  # a parameter of that name is an ordinary one
    return Macro(name, params, body, line, "varargs" in special, "kwargs" in special, "caller" in special)


def _mentions(node, names: set) -> set:
    """Which of `names` the statements read before assigning them (jinja2's find_undeclared)."""
    found: set = set()

    def visit(n):
        if isinstance(n, Name):
            if n.name in names:
                found.add(n.name)
        elif isinstance(n, (Set, SetBlock)):
            visit(n.expr if isinstance(n, Set) else n.body)
            for t in n.target.items if isinstance(n.target, TupleLit) else [n.target]:
                if isinstance(t, Name) and t.name not in found:
                    names.discard(t.name)
        elif isinstance(n, (list, tuple)):
            for item in n:
                visit(item)
        elif isinstance(n, dict):
            for item in n.values():
                visit(item)
        elif hasattr(n, "__dataclass_fields__"):
            for f in n.__dataclass_fields__:
                visit(getattr(n, f))

    names = set(names)
    visit(node)
    return found


def _describe(tok: Token) -> str:
    if tok.kind in ("name", "op"):
        return repr(tok.value)
    names = {"var_end": "'}}'", "block_end": "'%}'", "eof": "end of template", "text": "template text"}
    return names.get(tok.kind, tok.kind)
