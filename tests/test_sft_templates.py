"""The response-only mask of minilora.sft on every fixture chat template that renders a training conversation.

What must hold, for each assistant turn: its span in the rendered conversation holds its reply and its tool calls
(as the template writes them) and ends with the template's end-of-turn text; no user, system or tool message text
is trained. History-rewriting templates (Qwen3 drops the reasoning of turns before the last user query) are
checked on hand-derived spans. Measured 2026-12-01 over the 95 wild templates x 8 training conversations: 565
conversations masked, 188 refused by the template itself, 7 reported with the template and the turn (parallel
calls in Gemma 4 x2, diffusion-Gemma, gpt-oss and Mistral v0.3 JSON-schema x2, whose tool replies or calls are
rewritten into the assistant turn; Llama Guard, a moderation template).
"""

import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

sys.path.insert(0, str(Path(__file__).parent / "chat_template"))
from template_contexts import CONTEXTS  # noqa: E402

from minilora.chat_template import ChatTemplateError, render_chat_template  # noqa: E402
from minilora.sft import assistant_spans  # noqa: E402

WILD = sorted((FIXTURES / "chat_templates_wild").glob("*.jinja"))
TRAINING = ["ends_with_assistant", "reasoning_history", "tool_calls_dict", "tool_calls_json_string",
            "parallel_calls", "reasoning_tools", "korean", "thinking_field"]


# Llama Guard renders a conversation for moderation: its prompt is not a prefix of the conversation for any turn
NOT_FOR_SFT = {"hfjs-meta-llama--Llama-Guard-3-11B-Vision"}


def _render(template, extra):
    return lambda msgs, gen: render_chat_template(template, msgs, add_generation_prompt=gen, bos_token="<s>",
                                                  eos_token="</s>", **extra)


def _texts(message) -> list[str]:
    content = message.get("content")
    if isinstance(content, list):
        return [p["text"].strip() for p in content if p.get("text")]
    return [content.strip()] if isinstance(content, str) and content.strip() else []


@pytest.mark.skipif(not WILD, reason="../shared/fixtures is absent")
@pytest.mark.parametrize("path", WILD, ids=lambda p: p.stem)
def test_mask_holds_replies_and_nothing_else(path):
    template = path.read_text()
    masked = rendered = 0
    for name in TRAINING:
        messages, extra = CONTEXTS[name]
        render = _render(template, extra)
        try:
            full = render(messages, False)
        except ChatTemplateError:
            continue  # the template refuses this conversation (as transformers' renderer does)
        rendered += 1
        try:
            _, spans = assistant_spans(render, messages, full=full)
        except ValueError as e:
            assert "assistant turn" in str(e)  # names the turn; tokenize_conversation adds the template
            continue
        masked += 1
        trained = "".join(full[s:e] for s, e in spans)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "spans overlap or are out of order"
        replies = [t for m in messages if m["role"] == "assistant" for t in _texts(m)]
        for m in messages:
            for text in _texts(m):  # prompt text (not also part of a reply, like "20°C") is never trained
                if m["role"] != "assistant" and not any(text in r for r in replies):
                    assert text not in trained, (name, m["role"], text)
        for text in replies:  # every reply the template writes (once) is inside a span
            if full.count(text) == 1:
                assert any(text in full[s:e] for s, e in spans), (name, text)
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        header = render(messages[:first], True)[len(render(messages[:first], False)):].strip()  # <|im_start|>assi..
        for s, e in spans:  # no span runs into the next turn's header (which starts like the generation prompt)
            assert e == len(full) or not any(header.startswith(full[e - k:e]) for k in range(2, len(header) + 1)), (
                name, full[s:e + 20])
    if not rendered:
        pytest.skip("the template renders none of the training conversations (e.g. Command-R needs its own tools)")
    assert masked or path.stem in NOT_FOR_SFT, "no training conversation could be masked: nothing was tested"


QWEN3_SPANS = {  # hand-derived from trl's Qwen3 template: earlier turns lose their <think> block
    "ends_with_assistant": ["4<|im_end|>", "<think>\n\n</think>\n\n6<|im_end|>"],
    "reasoning_history": ["4<|im_end|>", "<think>\nThree plus three is six.\n</think>\n\n6<|im_end|>"],
    "tool_calls_dict": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul", "days": 2}}\n'
                        "</tool_call><|im_end|>", "<think>\n\n</think>\n\nIt is 22°C and clear in Seoul.<|im_end|>"],
    "parallel_calls": ['Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n'
                       '</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"query": "Seoul news", '
                       '"filters": ["today"]}}\n</tool_call><|im_end|>', "20°C, and no news.<|im_end|>"],
    "korean": ["안녕하세요! 맑습니다.<|im_end|>"],
}


@pytest.mark.skipif(not WILD, reason="../shared/fixtures is absent")
def test_turn_after_tool_replies_in_a_rewritten_history():
    """Qwen3.5: once "Thanks!" follows, the tool-call turn and the reply after the tool results lose <think>."""
    template = (FIXTURES / "chat_templates_wild" / "hfjs-Qwen--Qwen3.5-4B.jinja").read_text()
    messages, extra = CONTEXTS["parallel_calls"]
    full, spans = assistant_spans(_render(template, extra), messages)
    assert [full[s:e] for s, e in spans] == [
        "Let me check both.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSeoul\n</parameter>\n"
        "</function>\n</tool_call>\n<tool_call>\n<function=search>\n<parameter=query>\nSeoul news\n</parameter>\n"
        '<parameter=filters>\n["today"]\n</parameter>\n</function>\n</tool_call><|im_end|>',
        "20°C, and no news.<|im_end|>",
    ]


@pytest.mark.skipif(not WILD, reason="../shared/fixtures is absent")
@pytest.mark.parametrize("name", QWEN3_SPANS)
def test_history_rewriting_template_trains_what_the_conversation_shows(name):
    template = (FIXTURES / "chat_templates_wild" / "trl-qwen3.jinja").read_text()
    messages, extra = CONTEXTS[name]
    full, spans = assistant_spans(_render(template, extra), messages)
    assert [full[s:e] for s, e in spans] == QWEN3_SPANS[name]


@pytest.mark.skipif(not WILD, reason="../shared/fixtures is absent")
def test_underivable_mask_names_the_template_and_turn(tmp_path):
    """gpt-oss rewrites a turn with parallel tool calls beyond recognition: the error names the template and turn."""
    from tiny_tokenizers import build_byte_level_bpe, set_chat_template

    from minilora.sft import tokenize_conversation
    from minilora.tokenizer import load_tokenizer

    path = build_byte_level_bpe(tmp_path / "tok")
    set_chat_template(path, (FIXTURES / "chat_templates_wild" / "trl-gptoss.jinja").read_text(), "<s>", "</s>")
    tokenizer = load_tokenizer(path)
    messages, extra = CONTEXTS["parallel_calls"]
    with pytest.raises(ValueError, match=r"chat template of .*tok.*assistant turn 2"):
        tokenize_conversation(tokenizer, messages)
