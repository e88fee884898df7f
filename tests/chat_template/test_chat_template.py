"""minilora.chat_template against jinja2 configured exactly as transformers configures it.

The oracle (test-only) is jinja2's ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loopcontrols,
transformers' `tojson`, `raise_exception` and `strftime_now`, and its `{% generation %}` tag (rendered as is);
`test_oracle_matches_transformers` proves that environment renders the real templates like transformers itself.

Every comparison is character for character; where jinja2 raises, minilora must raise ChatTemplateError (with the
same message when the template calls raise_exception).
"""

import json
import random
import subprocess
import sys
from datetime import datetime

import pytest
from conftest import FIXTURES

from minilora.chat_template import ChatTemplateError, render_chat_template, select_chat_template

jinja2 = pytest.importorskip("jinja2")
from jinja2.ext import Extension, loopcontrols  # noqa: E402
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------------------------
class _Generation(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` tag, minus its index tracking: renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
ENV.filters["tojson"] = _tojson
ENV.globals["raise_exception"] = _raise_exception
ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


def oracle(template, messages, add_generation_prompt=False, bos_token="", eos_token="", **extra):
    context = {"tools": None, "documents": None, **extra}
    context.update(messages=messages, add_generation_prompt=add_generation_prompt)
    context.update(bos_token=bos_token, eos_token=eos_token)
    return ENV.from_string(template).render(**context)


def assert_same(template, messages, **kwargs) -> str:
    """Render with both engines; equal text, or both raise (same message for the template's raise_exception)."""
    try:
        want = oracle(template, messages, **kwargs)
    except Exception as oracle_error:
        with pytest.raises(ChatTemplateError) as ours:
            render_chat_template(template, messages, **kwargs)
        if type(oracle_error) is jinja2.exceptions.TemplateError:  # raised by the template's raise_exception()
            assert ours.value.message == str(oracle_error)
        return "raised"
    got = render_chat_template(template, messages, **kwargs)
    assert got == want, f"\nwant {want!r}\ngot  {got!r}"
    return got


# ---------------------------------------------------------------------------------------------------------------
# Real chat templates (../shared/fixtures/chat_templates/*.json) x conversations
# ---------------------------------------------------------------------------------------------------------------
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city (°C). 도시 이름은 한국어도 됩니다.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. \"Seoul\""}},
            "required": ["city"],
        },
        "return": {"type": "string"},
    },
}
TOOL_TURNS = [
    {"role": "user", "content": "What's the weather in Seoul?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "서울"}}}
        ],
    },
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "22°C, 맑음"},
    {"role": "assistant", "content": "It is 22°C and clear in Seoul."},
]


def _turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


CONVERSATIONS = {  # name -> (messages, extra template variables)
    "user": (_turns(("user", "Hello!")), {}),
    "system_user": (_turns(("system", "You answer in JSON."), ("user", "List two colors.")), {}),
    "multi_turn": (_turns(("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")), {}),
    "system_multi_turn": (
        _turns(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"), ("assistant", "6")),
        {},
    ),
    "ends_with_assistant": (_turns(("user", "Say hi"), ("assistant", "hi")), {}),
    "whitespace_unicode": (
        _turns(
            ("system", "  \n시스템: 항상 JSON으로 답하세요.\t\n"),
            ("user", "  안녕하세요? 😀 {{ not a tag }} {% neither %} \"quotes\" 'single' back\\slash  \n"),
            ("assistant", "\n\n{\"답\": \"네\"}\r\n  "),
            ("user", " \t다음 질문 "),
        ),
        {},
    ),
    "empty_content": (_turns(("user", ""), ("assistant", ""), ("user", " ")), {}),
    "assistant_first": (_turns(("assistant", "I speak first"), ("user", "ok")), {}),
    "list_content": (
        [{"role": "user", "content": [{"type": "text", "text": " Describe this. "}, {"type": "image"}]}],
        {},
    ),
    "tools": (TOOL_TURNS, {"tools": [WEATHER_TOOL]}),
    "tools_with_system": (_turns(("system", "Use tools."), ("user", "Weather in Busan?")), {"tools": [WEATHER_TOOL]}),
    "template_options": (
        _turns(("user", "Search the web for minilora")),
        {
            "builtin_tools": ["brave_search", "code_interpreter", "wolfram_alpha"],
            "date_string": "09 Mar 2025",
            "tools_in_user_message": False,
            "tools": [WEATHER_TOOL],
        },
    ),
}

FIXTURE_FILES = sorted((FIXTURES / "chat_templates").glob("*.json"))
needs_fixtures = pytest.mark.skipif(not FIXTURE_FILES, reason="../shared/fixtures/chat_templates is absent")


def _load_fixture(path):
    data = json.loads(path.read_text())
    return select_chat_template(data["chat_template"]), data["bos_token"] or "", data["eos_token"] or ""


@needs_fixtures
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_real_templates_equal_jinja2(path, conversation):
    template, bos, eos = _load_fixture(path)
    messages, extra = CONVERSATIONS[conversation]
    for add_generation_prompt in (False, True):
        kwargs = dict(add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
        assert_same(template, messages, **kwargs, **extra)


@needs_fixtures
def test_real_templates_render_and_refuse_as_expected():
    """Spot checks that the comparisons above exercise real output and real refusals, not just errors."""
    def render(name, conversation, **kwargs):
        template, bos, eos = _load_fixture(FIXTURES / "chat_templates" / f"{name}.json")
        messages, extra = CONVERSATIONS[conversation]
        return render_chat_template(template, messages, bos_token=bos, eos_token=eos, **extra, **kwargs)

    assert render("llama-3-instruct", "user", add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render("qwen2.5-instruct", "system_user") == (
        "<|im_start|>system\nYou answer in JSON.<|im_end|>\n<|im_start|>user\nList two colors.<|im_end|>\n"
    )
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        render("gemma", "system_user")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render("mistral-instruct-v0.2", "assistant_first")
    assert '"name": "get_weather"' in render("llama-3.1-instruct", "tools")


@needs_fixtures
def test_oracle_matches_transformers():
    """The test's jinja2 environment renders like transformers' own chat-template code."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    for path in FIXTURE_FILES:
        template, bos, eos = _load_fixture(path)
        for name in ("system_multi_turn", "whitespace_unicode", "tools"):
            messages, extra = CONVERSATIONS[name]
            kwargs = dict(add_generation_prompt=True, bos_token=bos, eos_token=eos, **extra)
            try:
                ours = oracle(template, messages, **kwargs)
            except jinja2.exceptions.TemplateError:
                continue
            theirs, _ = chat_template_utils.render_jinja_template([messages], chat_template=template, **kwargs)
            assert theirs[0] == ours, (path.stem, name)


# ---------------------------------------------------------------------------------------------------------------
# The project's own templates, one construct at a time
# ---------------------------------------------------------------------------------------------------------------
CONTEXT = {
    "x": 5,
    "s": "  Hello World  ",
    "d": {"b": 2, "a": 1},
    "lst": [3, 1, 2],
    "users": [{"name": "Ann", "age": 30, "admin": True}, {"name": "bob", "age": 25, "admin": False}],
    "none_val": None,
    "text": "they're bill's friends-of-mine",
    "ko": "안녕 세상",
}
MESSAGES = _turns(("system", "sys"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"))

CONSTRUCTS = {
    "loop_vars": "{% for m in messages %}{{ loop.index0 }}/{{ loop.index }}/{{ loop.first }}/{{ loop.last }}/"
    "{{ loop.length }}/{{ loop.revindex }}/{{ loop.revindex0 }}:{{ m.role }};{% endfor %}",
    "loop_neighbours": "{% for i in lst %}{{ loop.previtem }}<{{ i }}>{{ loop.nextitem }}|{{ loop.cycle('a', 'b') }}"
    "{% endfor %}{{ loop is defined }}",
    "for_if_filter": "{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }} {{ m.content }};"
    "{% endfor %}",
    "for_else": "{% for i in [] %}x{% else %}empty{% endfor %}|{% for i in lst if i > 9 %}x{% else %}none{% endfor %}",
    "for_unpack": "{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %}{% for k, v in d|items %}{{ k }}{{ v }}"
    "{% endfor %}{% for a, b in [[1, 2], (3, 4)] %}{{ a + b }}{% endfor %}{% for c in 'hi' %}[{{ c }}]{% endfor %}",
    "for_dict_and_undefined": "{% for k in d %}{{ k }}{% endfor %}{% for q in nope %}never{% endfor %}.",
    "break_continue": "{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i > 4 %}{% break %}"
    "{% endif %}{{ i }}{% endfor %}{% for i in [1] %}{% break %}{% else %}no{% endfor %}",
    "nested_loops": "{% for i in [1, 2] %}{% set outer = loop %}{% for j in 'ab' %}{{ outer.index }}{{ j }}"
    "{{ loop.index }} {% endfor %}{% endfor %}",
    "loop_scope": "{% set y = 'top' %}{% for i in lst %}[{{ y }}]{% set y = i %}({{ y }}){% endfor %}{{ y }}",
    "if_scope": "{% if true %}{% set z = 3 %}{% endif %}{{ z }}{% if false %}{% set x = 0 %}{% endif %}{{ x }}",
    # jinja2 binds a name whose first mention in a frame is an unconditional set to undefined for the whole frame,
    # hiding the render variable x=5 from the loop that runs before the set (see minilora/template_scopes.py)
    "static_scoping": "{% for i in [1] %}[{{ x }}]{% endfor %}{% set x = 1 %}{{ x }} {% for i in [1, 2] %}"
    "{% for j in [1] %}({{ s }}){% endfor %}{% set s = i %}{% endfor %} {% if false %}{% set lst = 0 %}{% endif %}"
    "{% for i in [1] %}{{ lst }}{% endfor %}",
    "if_elif_else": "{% for v in [1, 2, 3, none] %}{% if v == 1 %}one{% elif v == 2 %}two{% elif v %}many"
    "{% else %}none{% endif %} {% endfor %}",
    "namespace": "{% set ns = namespace(found=false, n=0) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.found = true %}{% set ns.n = ns.n + 1 %}{% endif %}{% endfor %}{{ ns.found }} {{ ns.n }} {{ ns }}"
    " {{ ns.missing is defined }} {{ ns['n'] }}",
    "set_forms": "{% set a, b = 1, 2 %}{{ a }}{{ b }} {% set t = 1, 'x' %}{{ t }} {% set blk %}  a {{ x }}\n"
    "{% endset %}[{{ blk }}] {% set messages = messages[1:] %}{{ messages|length }}",
    "literals": "{{ 1 }} {{ 1.5 }} {{ 1_000 }} {{ 0x1f }} {{ 1e3 }} {{ 'a\\nb\\tc\\u00e9' }} {{ \"q'\" }} "
    "{{ [1, 'a', none, true, False] }} {{ {'k': [1, 2], 3: none} }} {{ (1,) }} {{ () }} {{ 'a' \"b\" }} "
    "{{ none }} {{ True }} {{ [] }} {{ {} }} {{ [1, 2,] }}",
    "arithmetic": "{{ 7 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ 2 ** 10 }} {{ -x + 3 }} {{ 'ab' * 3 }} "
    "{{ [1] + [2] }} {{ x ~ 'px' ~ none ~ nope }} {{ 1 + 2 * 3 - 4 / 2 }} {{ '%s-%d' % ('a', 3) }} {{ 0.1 + 0.2 }}"
    " {{ -x|abs }} {{ -2 ** 2 }} {{ 10 / 4 * 2 }}",
    "comparisons": "{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'a' in 'abc' }} {{ 'z' not in lst }} {{ x == 5 and x != 4 }} "
    "{{ not x }} {{ none_val or 'dflt' }} {{ x and 'yes' }} {{ 0 or '' }} {{ not true == false }} "
    "{{ 'role' in messages[0] }} {{ 2 in d.values() }} {{ x >= 5 <= 6 }}",
    "tests": "{{ x is defined }} {{ nope is defined }} {{ nope is undefined }} {{ none_val is none }} {{ s is string }}"
    " {{ d is mapping }} {{ lst is iterable }} {{ x is number }} {{ lst is sequence }} {{ true is true }}"
    " {{ false is false }} {{ true is boolean }} {{ x is even }} {{ x is odd }} {{ x is divisibleby 5 }}"
    " {{ x is divisibleby(2) }} {{ x is not none }} {{ 'a' is in 'abc' }} {{ x is eq 5 }} {{ x is equalto(5) }}"
    " {{ x is gt 3 }} {{ x is sameas 5 }} {{ 1.0 is float }} {{ 1 is integer }} {{ true is integer }}"
    " {{ true is number }} {{ 'ab' is lower }} {{ 'AB' is upper }} {{ d is string }} {{ nope is iterable }}"
    " {{ nope is sequence }} {{ nope is mapping }} {{ raise_exception is callable }} {{ s.strip is callable }}"
    " {{ x is ne 4 }} {{ x is lt(9) }} {{ x is le 5 }} {{ x is ge 6 }} {{ d is sequence }} {{ s is iterable }}"
    " {{ 'upper' is filter }} {{ 'none' is test }} {{ x is not divisibleby 2 and x is odd }}",
    "ternary": "{{ 'a' if x > 3 else 'b' }} [{{ 'a' if x < 3 }}] {{ ('y' if false) is defined }} "
    "{{ 'p' if false else 'q' if true else 'r' }} {{ (messages[1:] if messages[0].role == 'system' else messages)"
    "|length }}",
    "subscripts": "{{ messages[0].role }} {{ messages[-1]['content'] }} {{ lst[1:] }} {{ lst[:-1] }} {{ lst[::-1] }}"
    " {{ s[2:7] }} {{ lst[10] is defined }} {{ d.a }} {{ d['b'] }} {{ d.missing is defined }} [{{ d['missing'] }}]"
    " {{ lst.0 }} {{ d.items is defined }} {{ d['items'] is defined }} {{ s.nope is defined }} {{ lst[1:][0] }}"
    " {{ 'abc'[1] }} {{ lst[-1:] }} {{ lst[x - 4] }} {{ users[0]['name'][0] }} {{ none_val[0] is defined }}",
    "filters_text": "{{ s|trim }}|{{ s|length }}|{{ s|count }}|{{ s|lower }}|{{ s|upper }}|{{ s|trim('H ') }}|"
    "{{ s|replace('l', 'L') }}|{{ s|replace('l', 'L', 1) }}|{{ x|string ~ '!' }}|{{ text|title }}|"
    "{{ text|capitalize }}|{{ 'hELLO wORLD'|title }}|{{ none_val|string }}|{{ 12|trim }}|{{ ko|upper }}|"
    "{{ ko|length }}",
    "filters_numbers": "{{ '42.7'|int }} {{ 'x'|int(7) }} {{ '0x1A'|int(0, 16) }} {{ 3.9|int }} {{ '3.5'|float }} "
    "{{ 'q'|float }} {{ -3|abs }} {{ 2.567|round(2) }} {{ 2.5|round }} {{ 2.1|round(0, 'ceil') }} "
    "{{ 2.9|round(method='floor') }} {{ lst|sum }} {{ users|sum(attribute='age') }} {{ lst|min }} {{ lst|max }} "
    "{{ users|max(attribute='age') }} {{ ['b', 'A']|min }} {{ []|max is defined }}",
    "filters_lists": "{{ lst|first }} {{ lst|last }} {{ lst|join(', ') }} {{ users|join(',', attribute='name') }} "
    "{{ lst|join }} {{ lst|sort }} {{ lst|sort(reverse=true) }} {{ users|sort(attribute='name')|map(attribute='name')"
    "|list }} {{ ['b', 'A', 'a']|unique|list }} {{ ['b', 'A', 'a']|sort }} "
    "{{ ['b', 'A', 'a']|sort(case_sensitive=true) }}"
    " {{ lst|reverse|list }} {{ 'abc'|reverse }} {{ d|list }} {{ d|items|list }} {{ d|dictsort }} "
    "{{ d|dictsort(by='value', reverse=true) }} {{ 'ab'|list }} {{ []|first is defined }} {{ ''|last is defined }} "
    "{{ users|map(attribute='missing', default='?')|list }} {{ users|map(attribute='name')|map('upper')|join('+') }} "
    "{{ lst|map('string')|join }} {{ users|sort(attribute='admin,name')|map(attribute='name')|join }}",
    "filters_select": "{{ users|selectattr('admin')|map(attribute='name')|list }} {{ users|rejectattr('admin')|list"
    "|length }} {{ users|selectattr('name', 'equalto', 'bob')|first }} {{ lst|select('odd')|list }} "
    "{{ lst|reject('odd')|list }} {{ messages|selectattr('role', 'in', ['user', 'assistant'])|list|length }} "
    "{{ users|selectattr('age', 'gt', 26)|map(attribute='name')|join }} {{ [0, 1, '', 'a']|select|list }} "
    "{{ ['code_interpreter', 'brave']|reject('equalto', 'code_interpreter')|join(', ') }}",
    "filters_default": "{{ nope|default('dflt') }} [{{ ''|default('dflt') }}] {{ ''|default('dflt', true) }} "
    "{{ nope|d('x') }} {{ none_val|default('n') }} {{ none_val|default('n', boolean=true) }} {{ x|default(1) }}",
    "filters_tojson": "{{ d|tojson }} {{ users|tojson(indent=2) }} {{ ko|tojson }} {{ {'a': [1, 2]}|tojson("
    "separators=(',', ':')) }} {{ d|tojson(sort_keys=true) }} {{ none_val|tojson }} {{ 'é\"<>'|tojson }} "
    "{{ [1.5, true, none]|tojson }} {{ (1, 2)|tojson }} {{ ko|tojson(ensure_ascii=true) }}",
    "filters_escape": "{{ '<a href=\"x\">&\\'</a>'|e }} {{ '<b>'|escape }} {{ '<i>'|safe }} {{ ('<a>'|safe) + '<b>' }}"
    " {{ '<x>' + ('&'|e) }} {{ ('<a>'|e)|length }} {{ 5|e }} {{ ('a'|e) ~ '<' }} {{ '<'|e is escaped }}",
    "string_methods": "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ 'xxhixx'.strip('x') }}|"
    "{{ 'xxhixx'.lstrip('x') }}|{{ 'xxhixx'.rstrip('x') }}|{{ 'a,b,c'.split(',') }}|{{ 'a b  c'.split() }}|"
    "{{ s.startswith('  H') }}|{{ s.endswith(('d', 'x')) }}|{{ 'hI'.upper() }}|{{ 'hI'.lower() }}|"
    "{{ text.title() }}|{{ s.replace('o', '0') }}|{{ 'a-b-c'.split('-', 1)[1] }}|{{ ', '.join(['a', 'b']) }}|"
    "{{ 'hello'.capitalize() }}|{{ 'abcabc'.find('c') }}|{{ 'abcabc'.count('b') }}|{{ 'a\\nb'.splitlines() }}|"
    "{{ '123'.isdigit() }}|{{ 'a b c'.rsplit(' ', 1) }}|{{ ko.split() }}",
    "dict_methods": "{{ d.get('a') }} {{ d.get('zz', 'none!') }} {{ d.get('zz') }} {{ d.keys()|list }} "
    "{{ d.values()|list }} {{ d.items()|list }} {{ d.items() }} {{ d['get']('b') }}",
    "globals": "{{ range(3)|list }} {{ range(1, 7, 2)|list }} {{ range(3) }} {{ dict(a=1, b='x') }} "
    "{{ namespace(a=1).a }} {{ namespace({'k': 2}).k }} {{ raise_exception is defined }}",
    "undefined": "[{{ nope }}] [{{ nope|length }}] {{ nope|default('d') }} {{ 'a' in nope }} {{ nope == nope }} "
    "[{{ nope|string }}] {{ nope ~ 'x' }} {{ nope|list }} {{ nope|trim }}| {{ nope is none }} {{ nope|lower }} "
    "{{ [nope] }} {{ nope|join(',') }} {{ nope|items|list }} {{ nope|first is defined }} {{ not nope }}",
    "precedence": "{{ 'a' + ' b ' | trim + 'c' }} {{ (1 + 2)|string ~ 'x' }} {{ (1 + 2) ~ 3 * 2 }} {{ 'ab' ~ 2 * 3 }} "
    "{{ not nope is defined }} {{ 2 * 3 ** 2 }} {{ (lst|length) - 1 }} {{ lst|length - 1 }} {{ -x|string }}",
    "comments": "a{# comment #}b{#- trimmed -#}  c\n  {# own line #}\nd{# multi\nline #}e\n{#- x #}\n f",
    "generation": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "{% set inside = 1 %}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}{{ inside }}",
    "strftime": "{{ strftime_now('%Y-%m-%d') }}",
    "brackets_in_tags": "{{ {'a': {'b': '}}'}}['a']['b'] }} {{ \"%}\" }} {% set q = {'x': [1, {'y': 2}]} %}"
    "{{ q.x[1].y }} {{ '{#' }}",
    "whitespace_real": """
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {{- '<<SYS>>\\n' + message.content | trim + '\\n<</SYS>>' }}
    {% elif message.role == 'user' %}
  [INST] {{ message.content }} [/INST]
    {%+ else %}
        {{ message.content }}   {# keep #}
    {% endif %}
{% endfor %}
{%- if add_generation_prompt +%}
    <start>
{% endif %}
trailing
""",
    "whitespace_crlf": "{% for m in messages %}\r\n  {{ m.role }}\r\n  {%- if loop.last %}\r\n last\r\n"
    "  {% endif %}\r\n{% endfor %}\r\n",
    "whitespace_tabs_unicode_spaces": "a\t\t{% if true %}\t\nb\u3000{%- if true -%}\u3000c{% endif %}{% endif %}"
    "\n  \t{# c #}\nz",
    "only_text": "plain text, no tags\n",
    "empty": "",
}


@pytest.mark.parametrize("name", CONSTRUCTS)
def test_constructs_equal_jinja2(name):
    for add_generation_prompt in (False, True):
        got = assert_same(CONSTRUCTS[name], MESSAGES, add_generation_prompt=add_generation_prompt, **CONTEXT)
        assert got != "raised", "these templates are all valid"


def _random_template(rng: random.Random, depth: int = 0) -> str:
    """Text and tags with every whitespace-control sign, nested blocks included."""
    texts = ["", " ", "  ", "\n", " \n", "\n  ", "\t\n\t", "a", "a \n", " b", "\n\n", "  x  \n  "]
    sign = lambda: rng.choice(["", "-", "+"])  # noqa: E731
    block = lambda body: "{%" + sign() + " " + body + " " + sign() + "%}"  # noqa: E731
    parts = []
    for _ in range(rng.randint(1, 5)):
        parts.append(rng.choice(texts))
        kind = rng.choice(["var", "comment", "set", "if", "for"] if depth < 2 else ["var", "comment", "set"])
        if kind == "var":
            parts.append("{{" + rng.choice(["", "-", "+"]) + " v " + rng.choice(["", "-"]) + "}}")
        elif kind == "comment":
            parts.append("{#" + rng.choice(["", "-", "+"]) + " c " + rng.choice(["", "-", "+"]) + "#}")
        elif kind == "set":
            parts.append(block("set v = v ~ 'z'"))
        elif kind == "if":
            parts += [block("if v"), _random_template(rng, depth + 1), block("else"), rng.choice(texts), block("endif")]
        else:
            parts += [block("for i in [1, 2]"), _random_template(rng, depth + 1), block("endfor")]
    parts.append(rng.choice(texts))
    return "".join(parts)


def _random_scoping_template(rng: random.Random, depth: int = 0) -> str:
    """Reads and sets of y/z (the render context has y) around loops, ifs, set blocks and loop-else frames."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        kinds = ["read", "read", "set", "set_tuple", "if", "for", "for_else", "set_block", "ns"]
        kind = rng.choice(kinds if depth < 3 else kinds[:4])
        name = rng.choice("yz")
        if kind == "read":
            parts.append(f"[{{{{ {name} }}}}]")
        elif kind == "set":
            parts.append(f"{{% set {name} = {rng.choice(['1', '2', 'y ~ 1', 'z ~ 2'])} %}}")
        elif kind == "set_tuple":
            parts.append(f"{{% set {name}, w = {name} ~ 't', 0 %}}")
        elif kind == "if":
            cond = rng.choice(["true", "false"])
            parts.append(f"{{% if {cond} %}}{_random_scoping_template(rng, depth + 1)}{{% else %}}"
                         f"{_random_scoping_template(rng, depth + 1)}{{% endif %}}")  # fmt: skip
        elif kind == "for":
            parts.append(f"{{% for i in [1, 2] %}}{_random_scoping_template(rng, depth + 1)}{{% endfor %}}")
        elif kind == "for_else":
            parts.append(f"{{% for i in [] %}}{{% else %}}{_random_scoping_template(rng, depth + 1)}{{% endfor %}}")
        elif kind == "set_block":
            parts.append(f"{{% set b %}}{_random_scoping_template(rng, depth + 1)}{{% endset %}}<{{{{ b }}}}>")
        else:
            parts.append(f"{{% set ns.v = ns.v ~ {name} %}}")
    return "".join(parts)


def test_scoping_fuzz_equals_jinja2():
    """Jinja's compile-time scoping (see minilora/template_scopes.py) on random nestings of frames."""
    rng = random.Random(1)
    for _ in range(400):
        template = "{% set ns = namespace(v='') %}" + _random_scoping_template(rng) + "({{ ns.v }})"
        assert_same(template, [], y="ctx")


_ATOMS = ["x", "s", "lst", "d", "nope", "none_val", "ko", "0", "1", "2.5", "-3", "'ab'", "''", "true", "false",
          "none", "[1, 'a']", "[]", "{'a': 1}", "(1, 2)", "messages[0]", "users"]  # fmt: skip
_BINARY_OPS = ["+", "-", "*", "/", "//", "%", "~", "and", "or", "==", "!=", "<", "<=", ">", ">=", "in", "not in"]
_FILTERS = ["length", "string", "trim", "first", "last", "list", "lower", "tojson", "int", "abs", "items|list",
            "sort", "join", "default(7)", "d(8, true)", "unique|list", "reverse|list", "title", "count", "float",
            "round", "selectattr('a')|list", "map(attribute='role')|list", "select|list"]  # fmt: skip
_TESTS = ["defined", "none", "string", "mapping", "iterable", "number", "sequence", "odd", "true", "integer",
          "eq 1", "in [1, 2]", "not defined", "not none"]  # fmt: skip
_SUBSCRIPTS = ["0", "-1", "'a'", "x", "'role'", "nope", "1"]
_SLICES = ["1:", ":1", "::-1", "-1:", "x:"]
_VARIABLES = ["x", "s", "lst", "d", "nope", "none_val", "ko", "users", "messages"]
_ATTRIBUTES = ["a", "role", "name", "content", "items", "get", "strip()", "upper()", "split()", "keys()", "get('a')"]


def _random_expression(rng: random.Random, depth: int = 0) -> str:
    if depth >= 3 or rng.random() < 0.3:
        return rng.choice(_ATOMS)
    e = lambda: _random_expression(rng, depth + 1)  # noqa: E731
    forms = [
        lambda: f"{e()} {rng.choice(_BINARY_OPS)} {e()}",
        lambda: f"{rng.choice(['not ', '-', '+'])}{e()}",
        lambda: f"({e()})",
        lambda: f"{e()} if {e()} else {e()}",
        lambda: f"{e()} if {e()}",
        lambda: f"({e()}|{rng.choice(_FILTERS)})",
        lambda: f"({e()} is {rng.choice(_TESTS)})",
        lambda: f"{e()}[{rng.choice(_SUBSCRIPTS)}]",
        # slices only on variables: jinja2 folds all-literal expressions at compile time, where `none[:1]` is
        # undefined instead of the error it is at run time (minilora gives the run-time error in both cases)
        lambda: f"{rng.choice(_VARIABLES)}[{rng.choice(_SLICES)}]",
        lambda: f"{e()}.{rng.choice(_ATTRIBUTES)}",
        lambda: f"{e()}, {e()}",
    ]
    return rng.choice(forms)()


def test_expression_fuzz_equals_jinja2():
    """Random expressions over awkward values: same text, or both engines raise."""
    rng = random.Random(2)
    compared = 0
    for _ in range(2000):
        template = "{{ " + _random_expression(rng) + " }}"
        try:
            if " at 0x" in oracle(template, MESSAGES, **CONTEXT):  # jinja2 printed a bound method's address
                continue
        except Exception:
            pass
        assert_same(template, MESSAGES, **CONTEXT)
        compared += 1
    assert compared > 1900


def test_whitespace_control_fuzz_equals_jinja2():
    rng = random.Random(0)
    for _ in range(400):
        template = _random_template(rng)
        assert_same(template, [], v="V")


# ---------------------------------------------------------------------------------------------------------------
# Errors: raised, with the template line, for bad templates, unsupported constructs and sandbox escapes
# ---------------------------------------------------------------------------------------------------------------
def _error(template, **context) -> ChatTemplateError:
    with pytest.raises(ChatTemplateError) as info:
        render_chat_template(template, MESSAGES, **{**CONTEXT, **context})
    return info.value


def test_raise_exception_message_and_line():
    e = _error("line 1\n{% if messages[0].role == 'system' %}\n{{ raise_exception('System role not supported') }}"
               "\n{% endif %}")  # fmt: skip
    assert (e.message, e.line) == ("System role not supported", 3)
    assert str(e) == "chat template line 3: System role not supported"


@pytest.mark.parametrize(
    "template, line, words",
    [
        ("a\n{% if x %}\nb", 3, "missing {% endif %}"),
        ("{{ x", 1, "unclosed {{ tag"),
        ("{% for i in lst %}\n{% endif %}", 2, "misplaced tag {% endif %}"),
        ("\n\n{{ 1 + }}", 3, "unexpected '}}'"),
        ("{% for %}{% endfor %}", 1, "expected name"),
        ("{% break %}", 1, "outside a for loop"),
        ("{{ x ) }}", 1, "unexpected ')'"),
        ("{# never closed", 1, "missing end of comment"),
        ("{{ 'bad\\N{nope}' }}", 1, "bad escape"),
        ("{{ x @ 2 }}", 1, "unexpected character '@'"),
        ("{% set true = 1 %}", 1, "cannot assign"),
    ],
)
def test_syntax_errors_name_the_line(template, line, words):
    e = _error(template)
    assert e.line == line and words in e.message, str(e)
    with pytest.raises((jinja2.exceptions.TemplateSyntaxError, SyntaxError)):  # jinja2: SyntaxError for break
        ENV.from_string(template)


@pytest.mark.parametrize(
    "template, line, words",
    [
        ("\n{% include 'other.jinja' %}", 2, "{% include %} is not supported"),
        ("{% import 'x' as y %}", 1, "{% import %} is not supported"),
        ("{% extends 'base' %}", 1, "{% extends %} is not supported"),
        ("{% block b %}{% endblock %}", 1, "{% block %} is not supported"),
        ("{% with a = 1 %}{% endwith %}", 1, "{% with %} is not supported"),
        ("{% do lst.append(1) %}", 1, "{% do %} is not supported"),
        ("x\n{% raw %}{{ y }}{% endraw %}", 2, "{% raw %} blocks are not supported"),
        ("{% for i in lst recursive %}{% endfor %}", 1, "recursive for loops"),
        ("{% for m in [] %}\n{{ m|wordwrap(3) }}{% endfor %}", 2, "filter 'wordwrap' is not supported"),
        ("{{ x|nonexistent }}", 1, "filter 'nonexistent' is not supported"),
        ("\n{{ x is prime }}", 2, "test 'prime' is not supported"),
        ("{{ lst|map('wordcount')|list }}", 1, "filter 'wordcount' is not supported"),
        ("{{ lst|select('prime')|list }}", 1, "test 'prime' is not supported"),
        ("{{ cycler(1, 2) }}", 1, "global 'cycler' is not supported"),
        ("{{ 'a{}'.format(1) }}", 1, "str.format is not supported"),
        ("{{ d.pop('a') }}", 1, "dict.pop is not supported"),
        ("{{ lst.append(4) }}", 1, "list.append is not supported"),
        ("{{ lst.index(1) }}", 1, "list.index is not supported"),
        ("{{ x.real }}", 1, "int.real is not supported"),
        ("{{ x|f.g }}", 1, "filter 'f.g' is not supported"),
        ("{{ lst|selectattr('x')|length }}", 1, "TypeError"),  # a generator has no len(), as in jinja2
        ("{{ lst|select('odd') }}", 1, "cannot print a generator"),
        ("{{ s.strip }}", 1, "cannot print the function"),
        ("\n{{ loop.changed(1) }}", 2, "'loop' is undefined"),
        ("{% for i in lst %}{{ loop.changed(i) }}{% endfor %}", 1, "loop.changed is not supported"),
        ("{{ ('<b>'|safe)|upper }}", 1, "|upper on a |safe or |escape result"),
        ("{{ ('<b>'|safe) * 2 }}", 1, "'*' on a |safe or |escape result"),
    ],
)
def test_unsupported_constructs_raise_with_line(template, line, words):
    e = _error(template)
    assert e.line == line and words in e.message, str(e)


def test_unknown_filters_inside_ifs_fail_only_when_evaluated():
    """Like jinja2: names in if-statements and inline ifs are looked up when used; elsewhere before rendering."""
    template = "{% if x %}\n{{ x|wordwrap(3) }}{% endif %}{{ (lst|nosuch) if x else lst|first }}"
    assert render_chat_template(template, [], x=0, lst=[1]) == oracle(template, [], x=0, lst=[1])
    with pytest.raises(ChatTemplateError, match="line 2: filter 'wordwrap' is not supported"):
        render_chat_template(template, [], x=1, lst=[1])
    hard = "{% if x %}{% for i in lst %}\n\n{{ i is nosuch }}{% endfor %}{% endif %}"  # a loop body is not soft
    with pytest.raises(ChatTemplateError, match="line 3: test 'nosuch' is not supported"):
        render_chat_template(hard, [], x=0, lst=[])
    with pytest.raises(jinja2.exceptions.TemplateAssertionError):
        oracle(hard, [], x=0, lst=[])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ d.__class__ }}",
        "{{ d['__class__'] }}",
        "{{ lst.__len__() }}",
        "{{ messages.__getitem__(0) }}",
        "{{ raise_exception.__globals__ }}",
        "{{ raise_exception._fn }}",
        "{{ namespace.__init__ }}",
        "{{ namespace._fn.__globals__ }}",
        "{{ s.strip.__self__ }}",
        "{{ (1).__class__ }}",
        "{{ range.__call__ }}",
        "{% set ns = namespace() %}{% set ns._private = 1 %}",
        "{% set ns = namespace() %}{{ ns.__dict__ }}",
        "{{ namespace(_x=1) }}",
        "{% for i in lst %}{{ loop._items }}{% endfor %}",
        "{{ x.__add__(1) }}",
        "{{ lipsum() }}",
        "{{ self }}{{ self.__init__ }}",
    ],
)
def test_sandbox_refuses_python_internals(template):
    with pytest.raises(ChatTemplateError):
        render_chat_template(template, MESSAGES, **CONTEXT)


def test_sandbox_allows_underscore_keys_of_plain_dicts():
    """jinja2 reads `d._meta` as the key '_meta' of a dict (it is data, not a Python attribute)."""
    assert_same("{{ m._meta }} {{ m['_meta'] }}", [], m={"_meta": "ok"})


@pytest.mark.parametrize(
    "template, words",
    [
        ("{{ 1 + 'a' }}", "TypeError"),
        ("{{ 1 + 2 ~ 3 }}", "TypeError"),  # ~ binds tighter than +: 1 + '23'
        ("{{ nope + 1 }}", "'nope' is undefined"),
        ("{{ nope.attr }}", "'nope' is undefined"),
        ("{{ nope[0] }}", "'nope' is undefined"),
        ("{{ nope() }}", "'nope' is undefined"),
        ("{{ nope < 1 }}", "'nope' is undefined"),
        ("{{ -nope }}", "'nope' is undefined"),
        ("{{ nope|int }}", "'nope' is undefined"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ x() }}", "not callable"),
        ("{% set x.a = 1 %}", "not a namespace()"),
        ("{% set a, b = [1] %}", "cannot unpack"),
        ("{% for i in 5 %}{% endfor %}", "TypeError"),
        ("{{ range(10**6) }}", "range() longer than 100000"),
        ("{{ d|tojson(indent=nope) }}{{ nope|tojson }}", "TypeError"),
        ("{% for k, v in 5|items %}{% endfor %}", "|items needs a mapping"),
    ],
)
def test_runtime_errors_raise_in_both(template, words):
    e = _error(template)
    assert e.line == 1 and words in e.message, str(e)
    with pytest.raises(Exception):
        oracle(template, MESSAGES, **CONTEXT)


def test_bad_arguments():
    with pytest.raises(ChatTemplateError, match="must be a string"):
        render_chat_template(None, MESSAGES)
    with pytest.raises(ChatTemplateError, match="list of dicts"):
        render_chat_template("x", ["not a dict"])


# ---------------------------------------------------------------------------------------------------------------
# API details
# ---------------------------------------------------------------------------------------------------------------
def test_context_like_transformers():
    """tools/documents are None unless given; extra variables reach the template; bos/eos default to ''."""
    template = "{{ tools is none }} {{ documents is none }} {{ tools|length if tools }} {{ foo }} [{{ bos_token }}]"
    assert render_chat_template(template, []) == "True True   []"
    assert render_chat_template(template, [], tools=[1, 2], foo="bar") == "False True 2 bar []"


def test_select_chat_template():
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    assert select_chat_template("S") == "S"
    assert select_chat_template(named) == "D"
    assert select_chat_template(named, "tool_use") == "T"
    assert select_chat_template(None) is None
    with pytest.raises(ChatTemplateError, match="no chat template named 'rag'.*default.*tool_use"):
        select_chat_template(named, "rag")
    with pytest.raises(ChatTemplateError, match="no chat template named 'default'"):
        select_chat_template([{"name": "tool_use", "template": "T"}])
    with pytest.raises(ChatTemplateError, match="must be a string or a list"):
        select_chat_template([{"name": "x"}])
    with pytest.raises(ChatTemplateError, match="no chat template named 'x'"):
        select_chat_template("S", "x")


def test_messages_are_not_modified():
    messages = [{"role": "user", "content": "hi", "extra": [1]}]
    snapshot = json.dumps(messages)
    render_chat_template("{% set m = messages[0] %}{% set messages = [] %}{{ m.extra|list }}", messages)
    assert json.dumps(messages) == snapshot


def test_no_jinja2_at_run_time():
    code = "import sys, minilora.chat_template as c; c.render_chat_template('{{ 1 }}', []); "
    code += "print('jinja2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
