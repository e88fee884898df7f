"""The built-in default model: its recipe builds a Hugging Face checkpoint that transformers reads the same way."""

import json

import pytest
import torch

from minilora.formats.safetensors_folder import load_model
from minilora.default.build import SHIPPED, build_default_model, ensure_default_model
from minilora.default.demos import SFT_DEMO
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


# --- the demonstrations `python -m minilora.train` runs with no --model/--data -------------------------------

def run_demo(argv: list[str], capsys) -> tuple[dict, str]:
    from minilora.train import parse_args, resolve_default, train

    final = train(resolve_default(parse_args(argv)))
    return final, capsys.readouterr().out


def replies(out: str, title: str) -> list[str]:
    """The assistant replies printed under '--- {title} ---'."""
    block = out.split(f"--- {title} ---")[1].split("\n\n")[0]
    return [line.split("assistant: ", 1)[1] for line in block.splitlines() if "assistant: " in line]


def test_no_arguments_run_the_base_demonstration_on_the_shipped_corpus(tmp_path, capsys):
    # A few steps of the real demonstration (the full run is the README's first command).
    final, out = run_demo(["--max-steps", "4", "--eval-every", "2", "--output", str(tmp_path)], capsys)
    assert "built-in demonstration" in out and "trainable params:" in out
    assert "--- before fine-tuning ---" in out and "--- after fine-tuning ---" in out
    assert "Haneul Tea Garden is" in out  # the demo's sample prompt
    config = (tmp_path / "config.toml").read_text()
    assert 'mode = "base"' in config and "domain.txt" in config and "r = 16" in config
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and final["step"] == 4


def language_of(text: str) -> str:
    return "ko" if any("가" <= ch <= "힣" for ch in text) else "en"


def is_answer_json(reply: str, language: str) -> bool:
    try:
        obj = json.loads(reply)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == {"answer", "language"} and obj["language"] == language


def test_sft_demonstration_teaches_the_json_answer_format(tmp_path, capsys):
    """The whole SFT demonstration (~35 s on 2 cores), 8 sample questions (4 from training, 4 unseen; ko/en):
    before, no reply is JSON; after, every reply opens the {"answer": ...} object, and most close it with the
    question's language. (Measured: 6 of 8 end with the right "language", 5 of 8 parse as such JSON.)"""
    final, out = run_demo(["--mode", "sft", "--output", str(tmp_path)], capsys)
    config = (tmp_path / "config.toml").read_text()
    assert 'mode = "sft"' in config and "instruct_json.jsonl" in config
    questions = SFT_DEMO["sample_prompts"].split("|")
    before, after = replies(out, "before fine-tuning"), replies(out, "after fine-tuning")
    assert len(before) == len(after) == len(questions) == 8
    assert not any(r.startswith("{") for r in before)
    assert all(r.startswith('{"answer": "') for r in after)
    closed = [r for q, r in zip(questions, after) if r.endswith(f'"language": "{language_of(q)}"}}')]
    assert len(closed) >= 4
    assert sum(is_answer_json(r, language_of(q)) for q, r in zip(questions, after)) >= 3
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in history if "val_loss" in r]
    assert val[-1] < val[0] / 2  # 9.7 → 4.0 on the held-out questions
