"""The built-in default model: its recipe builds a Hugging Face checkpoint that transformers reads the same way."""

import pytest
import torch

from minilora.checkpoint import load_model
from minilora.default.build import SHIPPED, build_default_model, ensure_default_model
from minilora.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_default_model(tmp_path_factory.mktemp("default") / "model", steps=2)


def test_recipe_builds_a_checkpoint_transformers_agrees_with(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "하늘 차밭은 달모루섬에 있다. Haneul Tea Garden is on Dalmoru Island."
    ours_tok, hf_tok = load_tokenizer(built), AutoTokenizer.from_pretrained(built)
    ids = ours_tok.encode(text)
    assert ids == hf_tok(text)["input_ids"] and ids[0] == ours_tok.bos_token_id
    assert ours_tok.decode(ids, skip_special_tokens=True) == text
    hf = AutoModelForCausalLM.from_pretrained(built, attn_implementation="eager").eval()
    x = torch.tensor([ids])
    torch.testing.assert_close(load_model(built)(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    chat = [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요."}]
    assert ours_tok.apply_chat_template(chat) == hf_tok.apply_chat_template(chat, tokenize=True, return_dict=False)


def test_the_default_model_is_shipped_or_built(monkeypatch, tmp_path):
    if (SHIPPED / "model.safetensors").is_file():
        assert ensure_default_model() == SHIPPED
    monkeypatch.setenv("MINILORA_DEFAULT_REBUILD", "1")
    monkeypatch.setenv("MINILORA_HOME", str(tmp_path))
    monkeypatch.setenv("MINILORA_DEFAULT_PRETRAIN_STEPS", "1")
    path = ensure_default_model()
    assert path.parent == tmp_path and (path / "model.safetensors").is_file()
    assert ensure_default_model() == path  # cached: the second call builds nothing
