"""Every real chat template we have, rendered by minilora and by transformers' own renderer, character for character.

The templates: ../shared/fixtures/chat_templates/*.json (20 families, with their bos/eos) and
../shared/fixtures/chat_templates_wild/*.jinja (95 in circulation: TRL's, huggingface.js's tests, vLLM's tool
templates, the newest families; INDEX.tsv says where each was found). The contexts: template_contexts.py (22
conversations: tools, tool calls, reasoning, enable_thinking, documents, Korean, content parts...), each with and
without the generation prompt. The oracle is `transformers.utils.chat_template_utils.render_jinja_template`, so
its own handling around the template (reasoning_content -> thinking, tools/documents, extra variables) is
compared too. Equal text, or both raise (with the same message when the template calls raise_exception).

Measured on 2026-12-01 (22 contexts x 2 = 44 renders per template): before macros were supported (main at
76e3882) 69 of the 95 wild templates rendered equal on all contexts (3,278 of 4,180 renders); now 95 of 95
(4,180 of 4,180), 3,400 of them rendering text in both engines, the rest raising in both.
"""

import json

import pytest
from conftest import FIXTURES
from template_contexts import CONTEXTS

from minilora.chat_template import ChatTemplateError, render_chat_template, select_chat_template

chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
jinja2 = pytest.importorskip("jinja2")

WILD = sorted((FIXTURES / "chat_templates_wild").glob("*.jinja"))
FAMILIES = sorted((FIXTURES / "chat_templates").glob("*.json"))
needs_fixtures = pytest.mark.skipif(not WILD or not FAMILIES, reason="../shared/fixtures is absent")


def _template(path) -> tuple[str, str, str]:
    if path.suffix == ".jinja":
        return path.read_text(), "<s>", "</s>"
    data = json.loads(path.read_text())
    return select_chat_template(data["chat_template"]), data["bos_token"] or "", data["eos_token"] or ""


def render_both(template: str, messages: list, **kwargs):
    """(minilora's text, transformers' text); None for an engine that raised. Raises if only one engine raised,
    or if both raised for a template's raise_exception with different messages."""
    try:
        want = chat_template_utils.render_jinja_template([messages], chat_template=template, **kwargs)[0][0]
        oracle_error = None
    except Exception as e:  # noqa: BLE001 - any jinja2 failure; minilora must then raise ChatTemplateError
        want, oracle_error = None, e
    try:
        got = render_chat_template(template, messages, **kwargs)
    except ChatTemplateError as e:
        assert oracle_error is not None, f"minilora raised, transformers rendered: {e}"
        if type(oracle_error) is jinja2.exceptions.TemplateError:  # the template's own raise_exception()
            assert e.message == str(oracle_error)
        return None, None
    assert oracle_error is None, f"transformers raised {oracle_error!r}, minilora rendered {got[:200]!r}"
    return got, want


@needs_fixtures
@pytest.mark.parametrize("path", WILD + FAMILIES, ids=lambda p: p.stem)
def test_template_equals_transformers_on_every_context(path):
    template, bos, eos = _template(path)
    rendered = 0
    for name, (messages, extra) in CONTEXTS.items():
        for add_generation_prompt in (False, True):
            kwargs = dict(add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos, **extra)
            got, want = render_both(template, messages, **kwargs)
            assert got == want, f"{path.stem} / {name} / add_generation_prompt={add_generation_prompt}"
            rendered += got is not None
    assert rendered > 0, "every context raised: the comparison tested nothing"


@needs_fixtures
def test_most_renders_produce_text():
    """The comparison above is mostly text against text, not error against error (3,400 of 4,180 measured)."""
    rendered = total = 0
    for path in WILD:
        template, bos, eos = _template(path)
        for messages, extra in CONTEXTS.values():
            total += 1
            try:
                render_chat_template(template, messages, bos_token=bos, eos_token=eos, **extra)
                rendered += 1
            except ChatTemplateError:
                pass
    assert total == 95 * len(CONTEXTS) and rendered > 0.75 * total, (rendered, total)


@needs_fixtures
def test_the_newest_families_render_their_tools_and_reasoning():
    """Spot checks on macro-based templates: the tool definitions, tool calls and reasoning really are in the text."""
    def render(stem, context, **kwargs):
        messages, extra = CONTEXTS[context]
        template, bos, eos = _template(FIXTURES / "chat_templates_wild" / f"{stem}.jinja")
        return render_chat_template(template, messages, bos_token=bos, eos_token=eos, **{**extra, **kwargs})

    qwen = render("hfjs-Qwen--Qwen3.5-4B", "tool_calls_dict")
    assert "<tools>" in qwen and "<function=get_weather>" in qwen and "<parameter=city>\nSeoul" in qwen
    hermes = render("hfjs-NousResearch--Hermes-2-Pro-Llama-3-8B_JSONSchema", "tool_definitions")
    assert "get_weather(city: str, unit: str, days: int)" in hermes  # json_to_python_type, a recursive macro
    gpt_oss = render("trl-gptoss", "thinking_field")
    assert "<|channel|>analysis<|message|>Greet back." in gpt_oss  # reads message.thinking
    lfm = render("trl-lfm2_2_5", "reasoning_history")
    assert "Three plus three is six." in lfm  # reasoning_content copied to thinking, as transformers does
    minicpm = render("hfjs-openbmb--MiniCPM3-4B", "tool_definitions")  # {% call %} with caller()
    assert "city" in minicpm and "get_weather" in minicpm


@needs_fixtures
@pytest.mark.parametrize("stem", ["trl-qwen3", "trl-gptoss", "trl-lfm2_2_5", "hfjs-CohereLabs--c4ai-command-a-03-2025",
                                  "hfjs-HuggingFaceTB--SmolLM3-3B"])
def test_tokenizer_render_chat_equals_transformers_apply_chat_template(stem, tmp_path):
    """Tokenizer.render_chat / apply_chat_template take tools, documents and any extra variable, and alias
    reasoning_content to thinking, exactly like transformers' tokenizer.apply_chat_template."""
    from tiny_tokenizers import build_byte_level_bpe, set_chat_template

    from minilora.tokenizer import load_tokenizer

    transformers = pytest.importorskip("transformers")
    path = build_byte_level_bpe(tmp_path / "tok")
    set_chat_template(path, (FIXTURES / "chat_templates_wild" / f"{stem}.jinja").read_text(), "<s>", "</s>")
    ours, hf = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    compared = 0
    for name in ("reasoning_history", "thinking_field", "enable_thinking", "disable_thinking", "tool_calls_dict",
                 "documents", "template_options", "parallel_calls"):
        messages, extra = CONTEXTS[name]
        try:
            want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        except Exception:  # noqa: BLE001 - the template refuses: minilora must too
            with pytest.raises(ChatTemplateError):
                ours.render_chat(messages, add_generation_prompt=True, **extra)
            continue
        assert ours.render_chat(messages, add_generation_prompt=True, **extra) == want, name
        assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra) == want
        compared += 1
    assert compared >= 5
