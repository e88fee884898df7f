"""The public API in minilora/__init__.py: every exported name resolves, and the documented calls work."""

import torch

import minilora
from tiny_models import load_hf_model, make_tiny_checkpoint


def test_every_exported_name_resolves():
    for name in minilora.__all__:
        assert getattr(minilora, name) is not None, name


def test_load_model_and_tokenizer_as_documented(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path, tokenizer="llama3")
    model = minilora.load_model(path, dtype="float32")
    tokenizer = minilora.load_tokenizer(path)
    ids = torch.tensor([tokenizer.encode("안녕하세요. Hello")])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    torch.testing.assert_close(logits, load_hf_model(path)(ids).logits, atol=1e-4, rtol=1e-4)
    assert tokenizer.decode(ids[0].tolist(), skip_special_tokens=True) == "안녕하세요. Hello"
