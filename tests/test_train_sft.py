"""`python -m minilora.train --mode sft`: every option of base FT, through the trainer, on a tiny chat model.

The model is a tiny random Llama with a Llama-3 byte-level tokenizer and a ChatML template written here. The data
is an original instruction set whose answers are always JSON ({"answer": "..."}), in English and Korean, with
system prompts and multi-turn conversations. What is checked, on real behaviour:

- the CLI run learns the format: afterwards `generate --adapter --chat` answers '{"answer": "' and stops at
  <|im_end|> (the ChatML end of turn, found from the template; it is not one of this tokenizer's eos ids);
- resume from a checkpoint gives the very losses of the uninterrupted run (LoRA + packing + grad accumulation
  with dropout, and full fine-tuning, whose saved model keeps the chat template);
- the three record formats holding the same conversations give the same run, loss for loss;
- packing changes nothing but the layout: with every step seeing the whole training set, packed and unpacked
  runs have the same training losses and the same (token-weighted) validation losses;
- the counted tokens are hand-computed: response-only = the reply tokens + one <|im_end|> per assistant turn;
  --train-on-prompt = every token but the first of each sample;
- --overlong truncate/drop and --on-error stop/skip print the counts computed here from the data.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
from tiny_models import make_tiny_checkpoint
from tiny_tokenizers import set_chat_template

from minilora.tokenizer import load_tokenizer
from minilora.train import train
from minilora.train_config import TrainConfig

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM = "Always answer in JSON."
# (country, capital, 나라, 수도): original data, the answer always comes as JSON.
CAPITALS = [("France", "Paris", "프랑스", "파리"), ("Korea", "Seoul", "한국", "서울"), ("Japan", "Tokyo", "일본", "도쿄"),
            ("Italy", "Rome", "이탈리아", "로마"), ("Spain", "Madrid", "스페인", "마드리드"),
            ("Egypt", "Cairo", "이집트", "카이로"), ("Peru", "Lima", "페루", "리마"),
            ("Kenya", "Nairobi", "케냐", "나이로비"), ("Chile", "Santiago", "칠레", "산티아고"),
            ("Canada", "Ottawa", "캐나다", "오타와"), ("Greece", "Athens", "그리스", "아테네"),
            ("Norway", "Oslo", "노르웨이", "오슬로")]


def answer(text: str) -> str:
    return json.dumps({"answer": text}, ensure_ascii=False)


def single_turn() -> list[list[dict]]:
    """24 one-exchange conversations (alpaca can hold them): English with an input field, Korean with a system."""
    conversations = []
    for country, capital, nara, sudo in CAPITALS:
        conversations.append([{"role": "user", "content": f"Name the capital city.\n\n{country}"},
                              {"role": "assistant", "content": answer(capital)}])
        conversations.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{nara}의 수도는?"},
                              {"role": "assistant", "content": answer(sudo)}])
    return conversations


def multi_turn() -> list[list[dict]]:
    """4 two-exchange conversations."""
    return [[{"role": "user", "content": f"What is the capital of {a[0]}?"}, {"role": "assistant", "content": answer(a[1])},
             {"role": "user", "content": f"And of {b[0]}?"}, {"role": "assistant", "content": answer(b[1])}]
            for a, b in zip(CAPITALS[:4], CAPITALS[4:8])]


def as_alpaca(messages: list[dict]) -> dict:
    record = {}
    if messages[0]["role"] == "system":
        record["system"], messages = messages[0]["content"], messages[1:]
    instruction, _, extra = messages[0]["content"].partition("\n\n")
    return {**record, "instruction": instruction, "input": extra, "output": messages[1]["content"]}


def as_messages(messages: list[dict]) -> dict:
    return {"messages": messages}


def as_sharegpt(messages: list[dict]) -> dict:
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in messages]}


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, tokenizer, data folder): messages.jsonl (28 conversations), val.jsonl (4), the formats."""
    root = tmp_path_factory.mktemp("sft")
    model = make_tiny_checkpoint("llama", root / "model", tokenizer="llama3")
    set_chat_template(model, CHATML)
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "messages.jsonl", [as_messages(m) for m in single_turn() + multi_turn()])
    write_jsonl(data / "alpaca.jsonl", [as_alpaca(m) for m in single_turn()])
    write_jsonl(data / "single.jsonl", [as_messages(m) for m in single_turn()])
    (data / "sharegpt.json").write_text(json.dumps([as_sharegpt(m) for m in single_turn()], ensure_ascii=False,
                                                   indent=1), encoding="utf-8")
    val = [single_turn()[1], single_turn()[6], multi_turn()[3],
           [{"role": "user", "content": "Name the capital city.\n\nGermany"},
            {"role": "assistant", "content": answer("Berlin")}]]
    write_jsonl(data / "val.jsonl", [as_messages(m) for m in val])
    return model, load_tokenizer(model), data


def config(tiny, out, **changes) -> TrainConfig:
    model, _, data = tiny
    base = dict(model=str(model), data=str(data / "messages.jsonl"), mode="sft", block_size=96, batch_size=4, r=4,
                alpha=8, dropout=0.0, lr=5e-3, warmup_steps=1, max_steps=2, eval_every=0, output=str(out), seed=1,
                device="cpu")
    return TrainConfig(**{**base, **changes})


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def data_counts(stdout: str) -> tuple[int, int]:
    """(training samples or rows, validation samples or rows) from the trainer's "data:" line."""
    m = re.search(r"^data: (\d+) training / (\d+) validation (?:samples|packed rows)", stdout, re.M)
    return int(m[1]), int(m[2])


def sft_summary(stdout: str) -> str:
    return re.search(r"^sft data: (.*)$", stdout, re.M)[1]


# ----------------------------------------------------------------------------------------------------------
# The command line, end to end: train, then chat with the adapter
# ----------------------------------------------------------------------------------------------------------
def test_cli_sft_run_learns_the_format_and_the_adapter_chats(tiny, tmp_path):
    from minilora.adapter import load_adapter
    from minilora.chat import chat_once
    from minilora.formats.safetensors_folder import load_model

    model, tok, data = tiny
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "minilora.train", "--mode", "sft", "--model", str(model), "--data",
         str(data / "messages.jsonl"), "--val-fraction", "0.25", "--max-steps", "16", "--batch-size", "8",
         "--lr", "2e-2", "--r", "8", "--dropout", "0", "--warmup-steps", "2", "--eval-every", "8", "--save-every",
         "8", "--output", str(run), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sft_summary(result.stdout) == "28 samples from 28 records"
    assert data_counts(result.stdout) == (21, 7)  # round(28 × 0.25) conversations held out, seeded
    val = [r["val_loss"] for r in records(run) if "val_loss" in r]
    assert [r["step"] for r in records(run) if "val_loss" in r] == [0, 8, 16] and val[-1] < val[0] - 1.0
    svg = (run / "loss.svg").read_text()
    assert svg.count("<polyline") == 3  # training and validation loss, and the learning rate (its own panel)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "config.toml",
                 "checkpoints/step-000008/trainer_state.pt", "checkpoints/step-000016/adapter_model.safetensors"):
        assert (run / name).is_file(), name

    # Chat through the CLI with the adapter: the learned JSON format, ended by ChatML's <|im_end|>.
    question = "What is the capital of Japan?"
    chat = subprocess.run([sys.executable, "-m", "minilora.generate", "--model", str(model), "--adapter",
                           str(run / "adapter"), "--chat", "--max-new-tokens", "24", "--device", "cpu"],
                          input=question + "\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    trained = load_model(model)
    load_adapter(trained, run / "adapter")
    reply = chat_once(trained, tok, [{"role": "user", "content": question}], max_new_tokens=24)
    assert reply.stopped and reply.token_ids[-1] == tok.token_to_id("<|im_end|>")
    assert reply.text.startswith('{"answer": "') and reply.text.endswith('"}')
    assert chat.stdout == f"> {reply.text}\n> \n"


# ----------------------------------------------------------------------------------------------------------
# Resume, full fine-tuning
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    dict(method="lora", dropout=0.1, packing=True, grad_accum=2),  # dropout: the RNG state must be restored too
    dict(method="full", lr=1e-3),
], ids=["lora-packing-accum", "full"])
def test_resume_reproduces_the_uninterrupted_run(tiny, tmp_path, options):
    whole = tmp_path / "whole"
    train(config(tiny, whole, max_steps=4, save_every=2, eval_every=2, **options))
    torch.manual_seed(1234)  # a different global RNG state must not matter
    resumed = tmp_path / "resumed"
    final = train(config(tiny, resumed, max_steps=4, eval_every=2,
                         resume=str(whole / "checkpoints" / "step-000002"), **options))
    a, b = losses(whole), losses(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    assert final["val_loss"] == pytest.approx(records(whole)[-1]["val_loss"], abs=1e-6)
    if options["method"] == "full":  # the saved model is a chat model: its template travels with it
        saved = load_tokenizer(resumed / "model")
        assert saved.chat_template == CHATML and (resumed / "model" / "model.safetensors").is_file()
        assert losses(whole)[4] < losses(whole)[1]


# ----------------------------------------------------------------------------------------------------------
# Formats, packing, labels
# ----------------------------------------------------------------------------------------------------------
def test_alpaca_messages_and_sharegpt_give_the_same_run(tiny, tmp_path, capsys):
    _, _, data = tiny
    runs = {}
    for name in ("alpaca.jsonl", "single.jsonl", "sharegpt.json"):
        train(config(tiny, tmp_path / name, data=str(data / name), val_fraction=0.25))
        runs[name] = records(tmp_path / name)
        assert sft_summary(capsys.readouterr().out) == "24 samples from 24 records"
    reference = runs.pop("single.jsonl")
    assert [r["step"] for r in reference] == [0, 1, 2, 2]
    for name, got in runs.items():
        for r, g in zip(reference, got, strict=True):
            for key in ("loss", "val_loss", "val_tokens"):
                assert g.get(key) == pytest.approx(r.get(key), abs=1e-6), (name, r["step"], key)


def test_packing_trains_and_evaluates_like_unpacked(tiny, tmp_path, capsys):
    """Batches of the whole training set (batch_size ≥ samples): a packed step sees exactly the tokens of an
    unpacked one, so the losses (token-weighted) and the updates agree; validation too, before and after."""
    _, _, data = tiny
    common = dict(data=str(data / "single.jsonl"), val_data=str(data / "val.jsonl"), batch_size=24, max_steps=2,
                  eval_every=1, block_size=128, lr=1e-2)
    train(config(tiny, tmp_path / "unpacked", **common))
    assert data_counts(capsys.readouterr().out) == (24, 4)
    train(config(tiny, tmp_path / "packed", packing=True, **common))
    rows, val_rows = data_counts(capsys.readouterr().out)
    assert rows <= 12 and val_rows < 4  # samples of 36-59 tokens: at least two per 128-token row
    unpacked, packed = records(tmp_path / "unpacked"), records(tmp_path / "packed")
    assert [r["step"] for r in unpacked] == [r["step"] for r in packed] == [0, 1, 2, 2]
    for u, p in zip(unpacked, packed):
        assert p.keys() == u.keys() and p.get("val_tokens") == u.get("val_tokens")
        for key in ("loss", "val_loss"):
            assert p.get(key) == pytest.approx(u.get(key), abs=1e-5), (u["step"], key)
    assert unpacked[-1]["val_loss"] < unpacked[0]["val_loss"] - 0.1  # the steps did change the model


def expected_tokens(tok, conversations, train_on_prompt: bool) -> int:
    """Counted (label != -100, after the shift) tokens, computed from the texts: with ChatML and a byte-level
    tokenizer a reply tokenises alone as in context ("\\n" before it and <|im_end|> after it are boundaries)."""
    if train_on_prompt:
        return sum(len(tok.apply_chat_template(m)) - 1 for m in conversations)
    return sum(len(tok.encode(m["content"], add_special_tokens=False)) + 1  # + <|im_end|>
               for c in conversations for m in c if m["role"] == "assistant")


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_counted_tokens_response_only_or_whole_sequence(tiny, tmp_path, train_on_prompt):
    model, tok, data = tiny
    val = [r["messages"] for r in map(json.loads, (data / "val.jsonl").read_text().splitlines())]
    train(config(tiny, tmp_path, val_data=str(data / "val.jsonl"), max_steps=1, train_on_prompt=train_on_prompt))
    step0 = records(tmp_path)[0]
    assert step0["val_tokens"] == expected_tokens(tok, val, train_on_prompt)
    assert expected_tokens(tok, val, True) > 2 * expected_tokens(tok, val, False)  # the two really differ


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_samples_are_truncated_or_dropped_with_counts(tiny, tmp_path, capsys, overlong):
    from minilora.formats.safetensors_folder import load_model
    from minilora.train_data import build_datasets

    model, tok, data = tiny
    conversations = single_turn() + multi_turn()
    lengths = [len(tok.apply_chat_template(m)) for m in conversations]
    block = 48  # the Korean and multi-turn conversations exceed it (49-73 tokens); every first prompt fits (<= 44)
    over = sum(n > block for n in lengths)
    assert over == 16
    cfg = config(tiny, tmp_path, block_size=block, overlong=overlong, max_steps=1, val_fraction=0.25)
    train(cfg)
    summary = sft_summary(capsys.readouterr().out)
    if overlong == "truncate":
        assert summary == f"28 samples from 28 records, {over} truncated"
    else:
        assert summary == f"{28 - over} samples from 28 records, {over} dropped overlong"
    train_set, val_set = build_datasets(cfg, tok, load_model(model).config)
    kept = train_set.samples + val_set.samples
    assert len(kept) == (28 if overlong == "truncate" else 28 - over)
    assert max(len(s["input_ids"]) for s in kept) == (block if overlong == "truncate" else max(
        n for n in lengths if n <= block))


# ----------------------------------------------------------------------------------------------------------
# Malformed records: stop with the line, or skip and count
# ----------------------------------------------------------------------------------------------------------
def malformed_file(tiny, path):
    good = [as_messages(m) for m in single_turn()[:8]]
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    lines.insert(2, json.dumps({"messages": [{"role": "bot", "content": "hi"}]}))  # line 3: unknown role
    lines.insert(5, json.dumps({"messages": [{"role": "user"}]}))  # line 6: no content
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_on_error_stop_is_a_one_line_error_naming_the_line(tiny, tmp_path):
    model, _, _ = tiny
    data = malformed_file(tiny, tmp_path / "bad.jsonl")
    result = subprocess.run([sys.executable, "-m", "minilora.train", "--mode", "sft", "--model", str(model),
                             "--data", str(data), "--output", str(tmp_path / "run"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {data}:3: ") and "bot" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training


def test_on_error_skip_proceeds_and_reports_the_count(tiny, tmp_path, capsys):
    data = malformed_file(tiny, tmp_path / "bad.jsonl")
    final = train(config(tiny, tmp_path / "run", data=str(data), on_error="skip", val_fraction=0.25))
    out = capsys.readouterr().out
    assert sft_summary(out) == "8 samples from 10 records, 2 skipped"
    assert data_counts(out) == (6, 2) and final["step"] == 2
