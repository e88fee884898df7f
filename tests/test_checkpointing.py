"""minilora.checkpointing (with the loop): resume survives every kill and every full disk, and a run stops rather
than save a wrong result.

Kills are injected at the exact moment that matters (a rename, a write) by making that call raise, which leaves
the folder as a kill -9 would; the run is then resumed in the same folder, as a user would.
"""

import errno
import json
import shutil

import pytest
import torch

from minilora import checkpointing
from minilora.checkpointing import MANIFEST, complete_checkpoints, find_checkpoint, incomplete
from minilora.errors import MiniloraError
from minilora.train import train
from minilora.train_config import TrainConfig
from tiny_models import make_tiny_training_inputs

TEXT = ("The river runs past the old mill and the children count the boats.\n\n"
        "In spring the orchard turns white, and bees visit every tree.\n\n") * 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_training_inputs(tmp_path_factory.mktemp("ckpt"), "data.txt", TEXT)


def config(tiny, out, **changes) -> TrainConfig:
    model, data = tiny
    base = dict(model=str(model), data=str(data), block_size=32, batch_size=2, r=2, alpha=4, lr=1e-3,
                warmup_steps=0, max_steps=4, save_every=2, eval_every=0, eval_batches=1, output=str(out), seed=3,
                device="cpu")
    return TrainConfig(**{**base, **changes})


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


# ----------------------------------------------------------------------------------------------------------
# Torn metrics, re-saved final checkpoint
# ----------------------------------------------------------------------------------------------------------
def test_torn_metrics_line_is_dropped_on_resume(tiny, tmp_path, capsys):
    train(config(tiny, tmp_path, max_steps=2, log_every=1))
    kept = records(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.71')  # a kill (or a full disk) in the middle of an append
    train(config(tiny, tmp_path, max_steps=4, log_every=1, resume="latest"))  # was: JSONDecodeError
    assert "dropped 1 incomplete line(s) (line 5)" in capsys.readouterr().out
    after = records(tmp_path)
    assert after[:len(kept)] == kept  # the complete records are kept as they were
    assert [r["step"] for r in after if "loss" in r] == [1, 2, 3, 4]


def test_resuming_a_finished_run_adds_no_second_final_record(tiny, tmp_path):
    train(config(tiny, tmp_path))
    before = records(tmp_path)
    train(config(tiny, tmp_path, resume="latest"))
    after = records(tmp_path)
    finals = [r for r in after if r["step"] == 4 and "loss" not in r]
    assert len(finals) == 1 and finals[0]["val_loss"] == pytest.approx(before[-1]["val_loss"], abs=1e-6)
    assert [r["step"] for r in after] == [r["step"] for r in before]
    assert latest(tmp_path) == "step-000004" and incomplete(tmp_path / "checkpoints" / "step-000004") is None
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_kill_while_re_saving_the_final_checkpoint_still_resumes(tiny, tmp_path, monkeypatch):
    """Re-saving step-4: the old folder is renamed aside before the new one comes in. Dying between the two
    renames used to leave `latest` naming nothing (the old code deleted step-4 first)."""
    train(config(tiny, tmp_path))
    real_rename, calls = checkpointing.Path.rename, []

    def dies_at_the_second_rename(self, target):
        calls.append(self.name)
        if self.name == ".step-000004.tmp":
            raise KeyboardInterrupt  # stands in for kill -9: nothing after this line runs
        return real_rename(self, target)

    monkeypatch.setattr(checkpointing.Path, "rename", dies_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny, tmp_path, resume="latest"))
    monkeypatch.undo()
    assert calls == ["step-000004", ".step-000004.tmp"]
    folder = tmp_path / "checkpoints"
    assert latest(tmp_path) == "step-000004" and not (folder / "step-000004").exists()  # `latest` names nothing
    assert complete_checkpoints(folder)[0] == folder / ".step-000004.old"  # ... but a complete copy exists
    found = find_checkpoint(config(tiny, tmp_path, resume="latest"))
    assert found == folder / ".step-000004.old"
    train(config(tiny, tmp_path, resume="latest"))  # resumes, re-saves, cleans up
    assert latest(tmp_path) == "step-000004" and incomplete(folder / "step-000004") is None
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000002", "step-000004"]


# ----------------------------------------------------------------------------------------------------------
# Incomplete checkpoints
# ----------------------------------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_its_size(tiny, tmp_path):
    train(config(tiny, tmp_path, max_steps=2))
    ckpt = tmp_path / "checkpoints" / "step-000002"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["step"] == 2
    assert manifest["files"] == {f.name: f.stat().st_size for f in ckpt.iterdir() if f.name != MANIFEST}
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"}


@pytest.mark.parametrize("damage, problem", [
    (lambda c: (c / "adapter_model.safetensors").unlink(), "is missing adapter_model.safetensors"),
    (lambda c: (c / "trainer_state.pt").write_bytes((c / "trainer_state.pt").read_bytes()[:100]),
     "has a cut-short trainer_state.pt (100 of"),
    (lambda c: (c / MANIFEST).unlink(), "is missing trainer_state.pt"),  # an old-style folder, half-copied
])
def test_incomplete_latest_falls_back_to_the_newest_complete(tiny, tmp_path, capsys, damage, problem):
    train(config(tiny, tmp_path))
    folder = tmp_path / "checkpoints"
    if problem.endswith("trainer_state.pt"):  # the no-manifest case: also lose a file
        (folder / "step-000004" / "trainer_state.pt").unlink()
    damage(folder / "step-000004")
    assert problem in incomplete(folder / "step-000004")
    train(config(tiny, tmp_path, max_steps=4, resume="latest"))  # was: FileNotFoundError
    out = capsys.readouterr().out
    assert f"note: {folder / 'step-000004'} {problem}" in out
    assert f"resuming from the newest complete checkpoint, {folder / 'step-000002'}" in out
    assert f"resumed from {folder / 'step-000002'} at step 2" in out
    assert incomplete(folder / "step-000004") is None  # steps 3-4 trained again and saved whole


def test_no_complete_checkpoint_says_so(tiny, tmp_path):
    train(config(tiny, tmp_path, max_steps=2))
    (tmp_path / "checkpoints" / "step-000002" / "adapter_model.safetensors").unlink()
    with pytest.raises(MiniloraError) as e:
        train(config(tiny, tmp_path, resume="latest"))
    assert str(e.value) == (f"--resume: no complete checkpoint in {tmp_path / 'checkpoints'} "
                            f"({tmp_path / 'checkpoints' / 'step-000002'} is missing adapter_model.safetensors); "
                            "nothing to resume from: start without --resume")
    with pytest.raises(MiniloraError, match="step-000002 is missing adapter_model.safetensors \\(incomplete\\)"):
        find_checkpoint(config(tiny, tmp_path, resume=str(tmp_path / "checkpoints" / "step-000002")))


def test_checkpoint_files_are_fsynced_before_the_folder_is_published(tiny, tmp_path, monkeypatch):
    synced, real = [], checkpointing.files.fsync_tree
    monkeypatch.setattr(checkpointing.files, "fsync_tree", lambda folder: (synced.append(folder.name), real(folder)))
    train(config(tiny, tmp_path, max_steps=2))
    assert synced == [".step-000002.tmp", ".adapter.tmp"]  # the temporary folders, i.e. before their rename


# ----------------------------------------------------------------------------------------------------------
# Full disk, read-only folder
# ----------------------------------------------------------------------------------------------------------
def test_full_disk_at_a_checkpoint_names_the_path_and_the_intact_checkpoint(tiny, tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    with pytest.raises(MiniloraError) as e:
        train(config(tiny, tmp_path))
    folder = tmp_path / "checkpoints"
    assert str(e.value) == (
        f"cannot write checkpoint {folder / 'step-000004'}: {folder / '.step-000004.tmp' / 'trainer_state.pt'}: "
        f"No space left on device (free some space); the last checkpoint, {folder / 'step-000002'}, is intact: "
        "fix this and continue with --resume")
    assert latest(tmp_path) == "step-000002" and incomplete(folder / "step-000002") is None
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000002"]  # no half-written folder


def test_full_disk_in_a_cli_run_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    from minilora.errors import run_cli
    from minilora.train import main

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    model, data = tiny
    argv = ["--model", str(model), "--data", str(data), "--output", str(tmp_path), "--max-steps", "2",
            "--block-size", "32", "--eval-batches", "1", "--device", "cpu"]
    assert run_cli(main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write checkpoint {tmp_path / 'checkpoints'}")
    assert err[0].endswith("no checkpoint of this run had been written yet (nothing to lose)")


def test_read_only_output_is_named_at_start_up(tiny, tmp_path, monkeypatch):
    import tempfile

    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # root ignores chmod, so EROFS is simulated
        if dir is not None and str(dir).startswith(str(tmp_path / "out")):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(MiniloraError) as e:
        train(config(tiny, tmp_path / "out"))
    assert str(e.value).startswith(f"cannot write the output folder (--output) {tmp_path / 'out'}: Read-only file "
                                   "system (write somewhere you have permission to")


# ----------------------------------------------------------------------------------------------------------
# No silent wrong result
# ----------------------------------------------------------------------------------------------------------
def test_nan_weights_stop_at_the_first_step(tiny, tmp_path):
    """NaN weights used to train to 'validation loss nan -> nan', save a NaN adapter and exit 0."""
    from safetensors.torch import load_file, save_file

    model_dir, data = tiny
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MiniloraError) as e:
        train(config((broken, data), tmp_path / "run"))
    assert str(e.value).startswith("step 1: the training loss is nan and the gradient norm nan (not finite): "
                                   "stopped without saving; no checkpoint of this run had been written yet")
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_non_finite_step_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    import minilora.trainer as trainer

    real_step, calls = trainer.train_step, []

    def poisoned_at_step_3(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # an overflow mid-run: one LoRA B matrix becomes inf
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", poisoned_at_step_3)
    with pytest.raises(MiniloraError) as e:
        train(config(tiny, tmp_path))
    folder = tmp_path / "checkpoints"
    assert str(e.value).startswith("step 3: the training loss is ")
    assert f"the last checkpoint, {folder / 'step-000002'}, is intact" in str(e.value)
    assert latest(tmp_path) == "step-000002" and not (tmp_path / "adapter").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000002"]


def test_full_disk_while_writing_the_result_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    """run/adapter used to be deleted first and then rewritten: a full disk left it half-written."""
    train(config(tiny, tmp_path, max_steps=2))
    adapter = tmp_path / "adapter"
    before = {f.name: f.read_bytes() for f in adapter.iterdir()}
    import minilora.adapter

    real = minilora.adapter.save_safetensors

    def full_in_result(path, *args, **kwargs):
        if ".adapter.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(minilora.adapter, "save_safetensors", full_in_result)
    with pytest.raises(MiniloraError, match=f"cannot write the result {adapter}: .*No space left on device"):
        train(config(tiny, tmp_path, max_steps=2, resume="latest"))
    assert {f.name: f.read_bytes() for f in adapter.iterdir()} == before
    assert not (tmp_path / ".adapter.tmp").exists()
