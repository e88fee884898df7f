"""minilora.chat and `generate --chat`: the prompt is the rendered conversation, replies stop at end of turn.

The model sees exactly tokenizer.apply_chat_template(messages, add_generation_prompt=True) (checked on the ids it
receives, and against transformers' apply_chat_template); the end-of-turn token is found from the template (a
ChatML template on a Llama-3 tokenizer: <|im_end|> is not one of its eos ids). To make a random model end its turn
at a known step, two rows of its lm_head are swapped: the token it would emit at step k and the end-of-turn token.
The logits are then the same permuted, so the first k tokens are unchanged and step k emits end-of-turn.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_checkpoint
from tiny_tokenizers import set_chat_template

from minilora.chat import Reply, chat_loop, chat_once, closing_token_id, end_of_turn_ids, fit_context
from minilora.formats.safetensors_folder import load_model
from minilora.errors import MiniloraError
from minilora.tokenizer import load_tokenizer

# Templates written for these tests (the real ones, from the fixtures, are checked below when present).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_LIKE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
              "supported') }}{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
              "else m['role'] %}{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
LLAMA3_LIKE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
PHI3_LIKE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
PLAIN = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
         "{% else %}{{ '### Response:\n' + m['content'] + '\n\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}")

# The token that closes an assistant turn in each fixture family (None: plain-text templates).
CLOSING = {
    "gemma": "<end_of_turn>", "gemma-2": "<end_of_turn>", "gemma-3": "<end_of_turn>",
    "llama-2-chat": "</s>", "llama-3-instruct": "<|eot_id|>", "llama-3.1-instruct": "<|eot_id|>",
    "llama-3.2-instruct": "<|eot_id|>", "mistral-instruct-v0.1-legacy": "</s>", "mistral-instruct-v0.1": "</s>",
    "mistral-instruct-v0.2": "</s>", "mistral-instruct-v0.3": "</s>", "qwen2-instruct": "<|im_end|>",
    "qwen2.5-instruct": "<|im_end|>", "smollm2-instruct": "<|im_end|>", "phi-3-mini": "<|end|>",
    "phi-3.5-mini": "<|end|>", "zephyr": "</s>", "tinyllama-chat": "</s>", "vicuna-style": "</s>",
    "alpaca-style": None,
}
U1, U2 = "What is the capital of France?", "And of Korea? 한국의 수도는?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with a Llama-3 byte-level tokenizer (eos ids <|end_of_text|>, <|eot_id|>) and a ChatML template."""
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("chat") / "model", tokenizer="llama3")
    set_chat_template(path, CHATML)
    return path, load_model(path), load_tokenizer(path)


class Recording(torch.nn.Module):
    """The model, recording the ids of every prefill (the calls that feed more than one token)."""

    def __init__(self, model, interrupt_at: int | None = None):
        super().__init__()
        self.model, self.config, self.prefills, self.calls = model, model.config, [], 0
        self.interrupt_at = interrupt_at  # raise KeyboardInterrupt (Ctrl-C) on this forward call

    def forward(self, input_ids, **kwargs):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        if input_ids.shape[1] > 1:
            self.prefills.append(input_ids[0].tolist())
        return self.model(input_ids, **kwargs)

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)


def lines(*texts):
    """An input() replacement: returns the texts one by one, then raises EOFError (Ctrl-D)."""
    queue = list(texts)

    def read(prompt=""):
        if not queue:
            raise EOFError
        item = queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def swap_rows(weight: torch.Tensor, a: int, b: int) -> None:
    weight[[a, b]] = weight[[b, a]].clone()


def ends_at(model, tokenizer, messages, k: int = 3) -> tuple[int, list[int]]:
    """(token t, first k tokens) of the free greedy reply such that swapping t and end-of-turn stops it at step k."""
    free = chat_once(model, tokenizer, messages, max_new_tokens=k + 1, stop_ids=[]).token_ids
    t = free[k]
    special = set(end_of_turn_ids(tokenizer)) | {tokenizer.token_to_id("<|im_end|>")}
    assert t not in free[:k] and not special & set(free[:k + 1]), free  # the trick needs a fresh, plain token
    return t, free[:k]


# ----------------------------------------------------------------------------------------------------------
# The end-of-turn token, from the template
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template, closing", [
    (CHATML, "<|im_end|>"), (GEMMA_LIKE, "<end_of_turn>"), (LLAMA3_LIKE, "<|eot_id|>"), (PHI3_LIKE, "<|end|>"),
    (PLAIN, None),
])
def test_closing_token_of_our_templates(tiny, tmp_path, template, closing):
    path = shutil.copytree(tiny[0], tmp_path / "m")
    tok = load_tokenizer(set_chat_template(path, template))
    assert closing_token_id(tok) == tok.token_to_id(closing)
    assert end_of_turn_ids(tok)[:2] == tok.eos_token_ids[:2]  # the eos ids first, then the closing token if new
    assert set(end_of_turn_ids(tok)) == set(tok.eos_token_ids) | ({tok.token_to_id(closing)} if closing else set())


@pytest.mark.parametrize("family", sorted(CLOSING))
def test_closing_token_of_real_templates(tiny, tmp_path, family):
    fixture = FIXTURES / "chat_templates" / f"{family}.json"
    if not fixture.is_file():
        pytest.skip(f"fixture {fixture} not present")
    data = json.loads(fixture.read_text())
    path = shutil.copytree(tiny[0], tmp_path / "m")
    tok = load_tokenizer(set_chat_template(path, data["chat_template"], data["bos_token"], data["eos_token"]))
    assert closing_token_id(tok) == tok.token_to_id(CLOSING[family])


def test_chatml_end_of_turn_is_added_to_the_eos_ids(tiny):
    _, _, tok = tiny
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end not in tok.eos_token_ids  # a Llama-3 tokenizer's eos ids do not know ChatML's marker
    assert end_of_turn_ids(tok) == tok.eos_token_ids + [im_end]


# ----------------------------------------------------------------------------------------------------------
# One turn
# ----------------------------------------------------------------------------------------------------------
def test_chat_once_feeds_the_rendered_conversation(tiny):
    """The ids the model receives = apply_chat_template(..., add_generation_prompt=True), ours and transformers'."""
    from transformers import AutoTokenizer

    path, model, tok = tiny
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": U1},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": U2}]
    spy = Recording(model)
    reply = chat_once(spy, tok, messages, max_new_tokens=5, stop_ids=[])
    expected = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert spy.prefills == [expected]
    assert expected == AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(expected).endswith("<|im_start|>assistant\n")
    assert len(reply.token_ids) == 5 and not reply.stopped
    assert reply.text == tok.decode(reply.token_ids, skip_special_tokens=True)


def test_reply_stops_at_the_end_of_turn_token(tiny):
    path, _, tok = tiny
    model = load_model(path)
    messages = [{"role": "user", "content": U1}]
    im_end = tok.token_to_id("<|im_end|>")
    t, first = ends_at(model, tok, messages, k=3)
    with torch.no_grad():
        swap_rows(model.lm_head.weight, t, im_end)
    reply = chat_once(model, tok, messages, max_new_tokens=20)
    assert reply == Reply(text=tok.decode(first, skip_special_tokens=True), token_ids=first + [im_end],
                          stopped=True)
    # Without the template's closing token among the stop ids, the same model runs on past it.
    longer = chat_once(model, tok, messages, max_new_tokens=20, stop_ids=tok.eos_token_ids)
    assert longer.token_ids[:4] == first + [im_end] and len(longer.token_ids) > 4


def test_fit_context_drops_the_oldest_exchanges_and_keeps_the_system_prompt(tiny):
    _, _, tok = tiny
    system = {"role": "system", "content": "Answer briefly."}
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"Question {i}: {U1}"}, {"role": "assistant", "content": "Paris."}]
    messages = [system] + turns + [{"role": "user", "content": U2}]
    full = len(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert fit_context(tok, messages, full + 10, 10) == (messages, 10)
    fitted, room = fit_context(tok, messages, full + 9, 10)  # one token short: the oldest exchange goes
    assert fitted == [system] + turns[2:] + messages[-1:]
    assert room == 10  # the reply may take max_new_tokens: there is room for more
    alone = [system, messages[-1]]
    with pytest.raises(MiniloraError, match="context"):
        fit_context(tok, alone, len(tok.apply_chat_template(alone, add_generation_prompt=True)), 10)
    # A huge answer budget reserves half the context, not all of it: the last exchange and the question stay.
    fitted, room = fit_context(tok, messages, full, 10_000)
    assert fitted == [system] + turns[-2:] + messages[-1:] and full // 2 <= room < full


# ----------------------------------------------------------------------------------------------------------
# The loop: turns, /reset, /quit, EOF, Ctrl-C
# ----------------------------------------------------------------------------------------------------------
def run_loop(model, tok, *inputs, **kwargs):
    import io

    out, err = io.StringIO(), io.StringIO()
    messages = chat_loop(model, tok, input_fn=lines(*inputs), out=out, err=err, max_new_tokens=6, **kwargs)
    return messages, out.getvalue(), err.getvalue()


def test_second_prompt_contains_the_first_exchange(tiny):
    _, model, tok = tiny
    spy = Recording(model)
    messages, out, _ = run_loop(spy, tok, U1, U2, system="Answer briefly.")
    sys_msg = {"role": "system", "content": "Answer briefly."}
    first = chat_once(model, tok, [sys_msg, {"role": "user", "content": U1}], max_new_tokens=6)
    convo = [sys_msg, {"role": "user", "content": U1}, {"role": "assistant", "content": first.text},
             {"role": "user", "content": U2}]
    second = chat_once(model, tok, convo, max_new_tokens=6)
    assert messages == convo + [{"role": "assistant", "content": second.text}]
    assert spy.prefills == [tok.apply_chat_template(convo[:2], add_generation_prompt=True),
                            tok.apply_chat_template(convo, add_generation_prompt=True)]
    assert spy.prefills[1][:len(spy.prefills[0])] == spy.prefills[0]  # ChatML renders earlier turns unchanged
    assert out == f"{first.text}\n{second.text}\n\n"  # each reply streamed on its line, then EOF's newline


def test_reset_quit_and_blank_lines(tiny):
    _, model, tok = tiny
    spy = Recording(model)
    messages, _, err = run_loop(spy, tok, U1, "  ", "/reset", U2, "/quit", "never read", system="Be kind.")
    start = [{"role": "system", "content": "Be kind."}]
    assert spy.prefills[1] == tok.apply_chat_template(start + [{"role": "user", "content": U2}],
                                                      add_generation_prompt=True)
    assert len(spy.prefills) == 2 and [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == U2 and "cleared" in err


def test_ctrl_c_stops_a_reply_and_forgets_it_then_leaves_at_the_prompt(tiny):
    _, model, tok = tiny
    spy = Recording(model, interrupt_at=3)  # prefill, one decoding step, then Ctrl-C
    messages, out, err = run_loop(spy, tok, U1, U2, KeyboardInterrupt(), "never read")
    assert spy.prefills[-1] == tok.apply_chat_template([{"role": "user", "content": U2}], add_generation_prompt=True)
    assert [m["content"] for m in messages if m["role"] == "user"] == [U2]
    assert "interrupted" in err and out.endswith("\n")


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(tiny, monkeypatch):
    _, model, tok = tiny
    monkeypatch.setattr(model.config, "max_position_embeddings", 40)
    messages, _, err = run_loop(model, tok, "Tea " * 60, U1)
    assert "error:" in err and "40" in err
    assert [m["content"] for m in messages if m["role"] == "user"] == [U1]


# ----------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------
def cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "minilora.generate", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_chat_with_adapter_two_turns_stops_at_end_of_turn(tiny, tmp_path):
    """Drive `generate --model M --adapter A --chat` through stdin; its transcript = chat_once in this process."""
    from minilora.adapter import load_adapter, save_adapter
    from minilora.lora import apply_lora

    path = shutil.copytree(tiny[0], tmp_path / "model")
    tok = load_tokenizer(path)
    model = load_model(path)
    apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (B = 0 would change nothing)
    save_adapter(model, tmp_path / "adapter")

    def with_adapter():
        m = load_model(path)
        load_adapter(m, tmp_path / "adapter")
        return m

    user1 = [{"role": "user", "content": U1}]
    t, first = ends_at(with_adapter(), tok, user1, k=3)
    weights = load_file(str(path / "model.safetensors"))
    im_end = tok.token_to_id("<|im_end|>")
    swap_rows(weights["lm_head.weight"], t, im_end)  # the model (with its adapter) now ends turn 1 at step 3
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})

    model = with_adapter()
    a1 = chat_once(model, tok, user1, max_new_tokens=12)
    assert a1.token_ids == first + [im_end] and a1.stopped
    a2 = chat_once(model, tok, user1 + [{"role": "assistant", "content": a1.text}, {"role": "user", "content": U2}],
                   max_new_tokens=12)
    result = cli("--model", path, "--adapter", tmp_path / "adapter", "--chat", "--max-new-tokens", 12,
                 "--device", "cpu", stdin=f"{U1}\n{U2}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"> {a1.text}\n> {a2.text}\n> \n"  # input() writes its prompt "> " to stdout
    assert "/reset" in result.stderr  # the banner goes to stderr, keeping stdout the conversation


def test_cli_model_without_chat_template_is_a_one_line_error(tiny, tmp_path):
    path = shutil.copytree(tiny[0], tmp_path / "m")
    set_chat_template(path, None)
    result = cli("--model", path, "--chat", "--device", "cpu", stdin="Hello\n")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "no chat template" in result.stderr and str(path) in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--chat", "--prompt", "Hi"], "not both"), ([], "not neither"), (["--prompt", "Hi", "--system", "x"], "--system"),
    (["--chat", "--system", "Be brief."], "system prompt"),  # GEMMA_LIKE refuses a system turn
])
def test_cli_chat_mistakes_are_one_line_errors(tiny, tmp_path, args, message):
    path = shutil.copytree(tiny[0], tmp_path / "m")
    set_chat_template(path, GEMMA_LIKE)
    result = cli("--model", path, "--device", "cpu", *args, stdin="Hello\n")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


# Reads the variables transformers passes: tools (a list of definitions) and enable_thinking.
TOOLS_TEMPLATE = ("{% if tools %}{{ '<|im_start|>system\nTools: ' + tools|map(attribute='function')|map(attribute="
                  "'name')|join(',') + '<|im_end|>\n' }}{% endif %}" + CHATML.replace(
                      "'<|im_start|>assistant\n' }}", "'<|im_start|>assistant\n' }}{% if enable_thinking is defined "
                      "and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"))


def test_cli_chat_passes_tools_and_enable_thinking_to_the_template(tiny, tmp_path):
    """`--tools FILE --no-enable-thinking`: the first prompt is apply_chat_template(tools=..., enable_thinking=False),
    checked by rendering it here and comparing the reply the CLI prints with chat_once on that prompt."""
    path = shutil.copytree(tiny[0], tmp_path / "m")
    set_chat_template(path, TOOLS_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    tok, model = load_tokenizer(path), load_model(path)
    user = [{"role": "user", "content": U1}]
    variables = {"tools": tools, "enable_thinking": False}
    text = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False, **variables)
    assert "Tools: get_weather" in text and text.endswith("<think>\n\n</think>\n\n")
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(path)
    assert text == hf.apply_chat_template(user, add_generation_prompt=True, tokenize=False, **variables)
    want = chat_once(model, tok, user, max_new_tokens=5, template_vars=variables)
    plain = chat_once(model, tok, user, max_new_tokens=5)
    result = cli("--model", path, "--chat", "--tools", tmp_path / "tools.json", "--no-enable-thinking",
                 "--max-new-tokens", 5, "--device", "cpu", stdin=f"{U1}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"> {want.text}\n> \n"
    assert want.token_ids != plain.token_ids  # so the CLI's output shows which prompt it was fed


@pytest.mark.parametrize("args, message", [
    (["--prompt", "Hi", "--enable-thinking"], "for --chat"), (["--chat", "--tools", "missing.json"], "missing.json"),
    (["--chat", "--tools", "BAD"], "JSON list of tool definitions"),
])
def test_cli_tools_mistakes_are_one_line_errors(tiny, tmp_path, args, message):
    (tmp_path / "BAD").write_text('{"name": "not a list"}')
    args = [str(tmp_path / a) if a in ("missing.json", "BAD") else a for a in args]
    result = cli("--model", tiny[0], "--device", "cpu", *args, stdin="Hello\n")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
