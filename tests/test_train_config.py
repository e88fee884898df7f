"""TrainConfig as a user meets it: --help generated from the field comments, did-you-mean, Hugging Face aliases,
TOML type errors by key, and `--output RUN --resume` restoring the run's saved configuration."""

import ast
import io
import json
import tokenize
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import minilora.train_config as train_config
from minilora.errors import MiniloraError, run_cli
from minilora.train import main, train
from minilora.train_config import CHOICES, SAFE_ON_RESUME, TrainConfig, build_parser, parse_args
from tiny_models import make_tiny_training_inputs

TEXT = ("The river runs past the old mill and the children count the boats.\n\n"
        "강물은 오래된 방앗간 옆을 흐르고 아이들은 배를 센다.\n\n") * 8


def comments_by_field() -> dict[str, str]:
    """The oracle for --help: each field's trailing comment, found with Python's own tokenizer and AST (not the
    regular expressions train_config.field_help uses)."""
    source = Path(train_config.__file__).read_text(encoding="utf-8")
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    return {n.target.id: comments.get(n.lineno) for n in cls.body if isinstance(n, ast.AnnAssign)}


def help_entries() -> dict[str, str]:
    """--help output as {first flag: its whole (unwrapped) entry}."""
    entries, current = {}, None
    for line in build_parser().format_help().splitlines():
        if line.startswith("  --"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif line.startswith("    ") and current:
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_gives_every_flag_its_comment_default_and_choices():
    comments, entries = comments_by_field(), help_entries()
    assert len(comments) == len(fields(TrainConfig)) >= 44
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert comments[f.name], f"TrainConfig.{f.name} has no comment: it is its --help line"
        entry = entries[flag]
        assert " ".join(comments[f.name].split()) in entry, flag
        default = "none" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) \
            else repr(f.default)
        assert entry.endswith(f"(default: {default})"), entry
        if f.name in CHOICES:
            assert "{" + ",".join(CHOICES[f.name]) + "}" in entry, entry
    # The help's sections are the class's `# --- ... ---` rules.
    text = build_parser().format_help()
    assert "evaluation, checkpoints, output:" in text and "LoRA (Hu et al. 2021" in text


def test_unknown_flag_suggests_the_nearest_one(capsys):
    assert run_cli(main, ["--learning-rate", "1e-4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown option --learning-rate; did you mean --lr?"]
    with pytest.raises(MiniloraError, match=r"unknown option --max-step; did you mean --max-steps\?"):
        parse_args(["--max-step", "3"])
    with pytest.raises(MiniloraError, match=r"unknown option --zzz; see --help"):
        parse_args(["--zzz"])


def test_hugging_face_spellings_are_aliases():
    cfg = parse_args(["--learning_rate", "1e-4", "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
                      "--gradient_accumulation_steps", "3", "--output_dir", "runs/x"])
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.grad_accum, cfg.output) == (1e-4, 2.0, 4, 3, "runs/x")


@pytest.mark.parametrize("line, message", [
    ('lr = "2e-4"', r"lr should be a number, got '2e-4' \(str\)"),  # was: '<=' not supported between str and int
    ('batch_size = "8"', r"batch_size should be an integer, got '8' \(str\)"),
    ("batch_size = 8.0", r"batch_size should be an integer, got 8.0 \(float\)"),
    ('packing = "yes"', r"packing should be true or false, got 'yes' \(str\)"),
    ("targets = 3", r"targets should be a string, got 3 \(int\)"),
    ("max_steps = true", r"max_steps should be an integer, got True \(bool\)"),
    ("learning_rate = 1e-4", r"unknown option\(s\) learning_rate"),
])
def test_toml_errors_name_the_key_and_the_type(tmp_path, line, message):
    toml = tmp_path / "run.toml"
    toml.write_text(line + "\n")
    with pytest.raises(MiniloraError, match=r"config file .*run\.toml: " + message):
        parse_args(["--config", str(toml)])
    toml.write_text("lr = 1\nmax_steps = 3\n")  # an integer is a fine number
    assert parse_args(["--config", str(toml)]).lr == 1.0


# --- --output RUN --resume -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, _ = make_tiny_training_inputs(tmp_path_factory.mktemp("resume"), "data.txt", TEXT)
    return model.parent


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_output_resume_restores_the_saved_run(tiny, tmp_path, monkeypatch):
    """The README's form: a run started with relative paths is continued from another folder with only
    `--output RUN --resume --max-steps N`; its steps equal an uninterrupted run's."""
    monkeypatch.chdir(tiny)
    flags = ["--model", "model", "--data", "data.txt", "--block-size", "32", "--batch-size", "4", "--r", "4",
             "--alpha", "8", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "2", "--save-every", "2",
             "--seed", "5", "--device", "cpu", "--sample-prompts", ""]
    assert main(flags + ["--max-steps", "4", "--output", str(tmp_path / "full")]) == 0
    assert main(flags + ["--max-steps", "2", "--output", str(tmp_path / "run")]) == 0  # "interrupted" at 2
    saved = (tmp_path / "run" / "config.toml").read_text()
    assert f'model = "{tiny / "model"}"' in saved and f'data = "{tiny / "data.txt"}"' in saved  # absolute
    assert "\nresume =" not in saved and "overwrite =" not in saved  # how it was started, not what it is

    monkeypatch.chdir(tmp_path)  # elsewhere: the relative paths of the first command no longer resolve
    cfg = parse_args(["--output", "run", "--resume", "--max-steps", "4"])
    assert (cfg.r, cfg.lr, cfg.block_size, cfg.seed, cfg.max_steps, cfg.resume) == (4, 3e-3, 32, 5, 4, "latest")
    train(cfg)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "run")
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step

    with pytest.raises(MiniloraError, match=r"cannot change --lr \(saved 0\.003, given 0\.1\).*--max-steps"):
        parse_args(["--output", "run", "--resume", "--lr", "0.1"])
    with pytest.raises(MiniloraError, match=r"--r \(saved 4, given 8\); --targets"):
        parse_args(["--output", "run", "--resume", "--r", "8", "--targets", "q_proj"])
    # Repeating the original flags is no change (paths compare resolved), and every safe flag may change.
    same = parse_args(["--output", "run", "--resume", "--model", str(tiny / "model"), "--r", "4",
                       "--eval-every", "1", "--save-every", "1", "--log-every", "2", "--sample-tokens", "5"])
    assert (same.eval_every, same.save_every, same.log_every, same.sample_tokens) == (1, 1, 2, 5)
    assert {"max_steps", "eval_every", "save_every", "log_every", "sample_prompts"} <= set(SAFE_ON_RESUME)


def test_resume_of_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    assert run_cli(main, ["--output", str(tmp_path / "nothing"), "--resume", "--model", "m", "--data", "d.txt"]) == 1
    assert "error:" in capsys.readouterr().err


def test_the_readme_train_commands_parse():
    """Every `python -m minilora.train ...` line of the README uses only flags that exist (no did-you-mean)."""
    import shlex

    from minilora.train_config import parse_flags

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in readme.split("```bash")[1:]:
        text = block.split("```")[0].replace("\\\n", " ")
        commands += [line.split("#")[0] for line in text.splitlines() if line.startswith("python -m minilora.train")]
    assert len(commands) >= 6
    for command in commands:
        parse_flags(shlex.split(command)[3:])  # raises MiniloraError on an unknown flag
    assert any(shlex.split(c)[3:] == ["--output", "runs/my-run", "--resume"] for c in commands)
