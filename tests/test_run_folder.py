"""The run folder's life cycle: a folder holding a run is refused (unless --resume / --overwrite), each demo has
its own folder, --keep-checkpoints prunes (never `latest` or `best`), --save-best exports the best checkpoint,
--patience stops early; and --log tensorboard writes the same scalars as metrics.jsonl."""

import json
import sys
from pathlib import Path

import pytest

import minilora.trainer as trainer_module
from minilora.checkpointing import Best, mark_best, prune_checkpoints
from minilora.default.demos import demo_output
from minilora.errors import MiniloraError
from minilora.train import resolve_default, train
from minilora.train_config import TrainConfig, parse_args
from tiny_models import make_tiny_training_inputs

TEXT = ("The river runs past the old mill and the children count the boats.\n\n"
        "강물은 오래된 방앗간 옆을 흐르고 아이들은 배를 센다.\n\n") * 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_training_inputs(tmp_path_factory.mktemp("ckpt"), "data.txt", TEXT)


def config(tiny, out, **changes) -> TrainConfig:
    model, data = tiny
    base = dict(model=str(model), data=str(data), block_size=32, batch_size=4, r=2, alpha=4, dropout=0.0,
                lr=1e-3, warmup_steps=1, max_steps=4, eval_every=0, output=str(out), seed=0, device="cpu",
                log_every=100)
    return TrainConfig(**{**base, **changes})


def steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tiny, tmp_path):
    run = tmp_path / "run"
    (tmp_path / "run").mkdir()
    (run / "notes.txt").write_text("mine")  # a folder with other files is not a run: fine
    train(config(tiny, run, max_steps=8, save_every=2, keep_checkpoints=0))
    assert steps(run) == ["step-000002", "step-000004", "step-000006", "step-000008"]
    with pytest.raises(MiniloraError, match=r"already holds a run \(config\.toml, metrics\.jsonl, loss\.svg, "
                                            r"checkpoints, adapter\): continue it with --resume, replace it with "
                                            r"--overwrite"):
        train(config(tiny, run, max_steps=2, save_every=2))
    # The case: a new 2-step run in the old folder no longer mixes with the old step-4...8 checkpoints.
    train(config(tiny, run, max_steps=2, save_every=2, overwrite=True))
    assert steps(run) == ["step-000002"] and (run / "checkpoints" / "latest").read_text() == "step-000002\n"
    assert [r["step"] for r in records(run)] == [0, 2, 2] and (run / "notes.txt").read_text() == "mine"


def test_each_demonstration_writes_its_own_folder():
    assert [demo_output(m, k) for m, k in [("base", "lora"), ("sft", "lora"), ("base", "qlora"), ("sft", "qlora"),
                                          ("base", "full")]] == \
        ["runs/default", "runs/default-sft", "runs/default-qlora", "runs/default-sft-qlora", "runs/default-full"]
    assert resolve_default(parse_args(["--method", "qlora"])).output == "runs/default-qlora"
    assert resolve_default(parse_args(["--mode", "sft"])).output == "runs/default-sft"
    assert resolve_default(parse_args([])).output == "runs/default"
    assert resolve_default(parse_args(["--method", "qlora", "--output", "mine"])).output == "mine"


def test_keep_checkpoints_keeps_the_newest_n(tiny, tmp_path, monkeypatch):
    """The issue's run: 24 steps, a checkpoint every 2 — 12 step folders before, 3 (the default) now."""
    import minilora.checkpointing as checkpointing

    real_save, saved = checkpointing.save_checkpoint, []
    monkeypatch.setattr(trainer_module, "save_checkpoint", lambda *a: saved.append(real_save(*a)) or saved[-1])
    assert TrainConfig().keep_checkpoints == 3
    train(config(tiny, tmp_path / "three", max_steps=24, save_every=2, block_size=16, batch_size=2))
    assert len(saved) == 12  # what keep_checkpoints=0 would leave
    assert steps(tmp_path / "three") == ["step-000020", "step-000022", "step-000024"]


def test_pruning_never_deletes_what_latest_or_best_names(tmp_path):
    for step in range(2, 12, 2):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step-000004\n")  # e.g. resumed from an older checkpoint
    mark_best(tmp_path, 2)
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-000006"]
    assert steps(tmp_path) == ["step-000002", "step-000004", "step-000008", "step-000010"]
    assert prune_checkpoints(tmp_path, keep=0) == []


def scripted_validation(monkeypatch, losses: dict[int, float]):
    """Replace the validation loss at step s by losses[s] (the selection logic is under test, not evaluate);
    the step is the number of optimiser steps taken so far."""
    real_evaluate, real_step, done = trainer_module.evaluate, trainer_module.train_step, []

    def train_step(*args, **kwargs):
        done.append(1)
        return real_step(*args, **kwargs)

    def evaluate(model, val_set, cfg, device):
        out = real_evaluate(model, val_set, cfg, device)
        return {**out, "val_loss": losses.get(len(done), out["val_loss"])}

    monkeypatch.setattr(trainer_module, "train_step", train_step)
    monkeypatch.setattr(trainer_module, "evaluate", evaluate)


def test_save_best_exports_the_checkpoint_with_the_lowest_validation_loss(tiny, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, {0: 9.0, 2: 5.0, 4: 3.0, 6: 4.0, 8: 4.5})  # best at step 4; 8 is the end
    run = tmp_path / "run"
    train(config(tiny, run, max_steps=8, eval_every=2, save_best=True, keep_checkpoints=1, lr=1e-2))
    assert (run / "checkpoints" / "best").read_text() == "step-000004\n"
    assert steps(run) == ["step-000004", "step-000008"]  # keep 1 = the newest, plus the best
    best = run / "checkpoints" / "step-000004" / "adapter_model.safetensors"
    last = run / "checkpoints" / "step-000008" / "adapter_model.safetensors"
    exported = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert exported == best.read_bytes() and exported != last.read_bytes()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert not (run / "adapter" / "trainer_state.pt").exists()


def test_patience_stops_after_n_evaluations_without_improvement(tiny, tmp_path, monkeypatch, capsys):
    scripted_validation(monkeypatch, {0: 9.0, 2: 5.0, 4: 3.0, 6: 3.5, 8: 3.2, 10: 1.0})
    run = tmp_path / "run"
    final = train(config(tiny, run, max_steps=12, eval_every=2, patience=2, save_best=True))
    assert "early stop at step 8: no better validation loss in 2 evaluations (best 3.0000 at step 4)" in \
        capsys.readouterr().out
    assert final["step"] == 8 and max(r["step"] for r in records(run)) == 8
    assert (run / "checkpoints" / "best").read_text() == "step-000004\n"
    best = Best.from_records(records(run))
    assert (best.step, best.loss) == (4, 3.0)


def test_tensorboard_shows_the_same_scalars_as_metrics_jsonl(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(config(tiny, run, max_steps=4, eval_every=2, log_every=1, log="tensorboard"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "val_loss", "grad_norm"):
        expected = [(r["step"], r[key]) for r in records(run) if r.get(key) is not None]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key  # float32 events


def test_tensorboard_missing_is_a_clear_error_before_loading(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(trainer_module, "load_model_and_tokenizer", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(MiniloraError, match=r"--log tensorboard needs the tensorboard package: pip install "
                                            r"tensorboard"):
        train(config(tiny, tmp_path / "run", log="tensorboard"))
