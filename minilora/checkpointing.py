"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    run/checkpoints/step-NNNNNN/   adapter_model.safetensors + adapter_config.json (LoRA/QLoRA)
                                   or model.safetensors + config.json + tokenizer files (full FT)
                                   trainer_state.pt: step, optimizer, scheduler, RNG states
                                   checkpoint.json: the manifest, written last: {"step", "files": {name: bytes}}
    run/checkpoints/latest         the name of the newest complete checkpoint
    run/checkpoints/best           with --save-best: the name of the checkpoint with the lowest validation loss

A checkpoint is built in a temporary folder, its files fsynced, and renamed into place, then `latest` is rewritten
atomically, so a run killed at any moment (or stopped by a full disk) leaves `latest` naming a complete
checkpoint. Re-saving a step that exists (resuming a finished run saves its last step again) never deletes the old
folder before the new one is in: the old one is renamed aside (`.step-N.old`), the new one renamed in, then the old
one deleted. A kill between those renames leaves `latest` naming no folder for a moment; `find_checkpoint` then
takes the newest complete checkpoint, the set-aside one included, so a resume always finds one. A folder whose
manifest is missing or lists a file that is absent or shorter is incomplete (a copy cut short, a file deleted by
hand) and is never resumed from.

The data position is not stored: it is a function of the step (train_data.Batches), so restoring the step
restores the batches.

With many processes every rank takes part in gathering the full weights and optimizer state (FSDP2 shards them),
rank 0 alone writes, and the files are those of one process: a checkpoint resumes with any number of processes,
as long as processes × --batch-size (the global batch) stays the same.

Also here, the run folder's life cycle: a folder that holds a run is refused unless the run is resumed or
`--overwrite` is given (two runs in one folder mix their checkpoints); only the newest `--keep-checkpoints`
checkpoints stay (never the ones `latest` and `best` name); `Best` follows the lowest validation loss for
`--save-best` and `--patience`.
"""

import json
import math
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed, files
from .errors import MiniloraError
from .train_config import TrainConfig

CHECKPOINTS = "checkpoints"
MANIFEST = "checkpoint.json"
_NAME = re.compile(r"^(?:step-(\d+)|\.step-(\d+)\.old)$")  # a published checkpoint, or one set aside
TRAINED_ON = "minilora_base.json"  # beside a QLoRA adapter: its base was 4-bit NF4 (merge.py reads it)
RUN_OUTPUTS = ("config.toml", "metrics.jsonl", "loss.svg", CHECKPOINTS, "adapter", "model", "tensorboard")


def prepare_run_dir(cfg: TrainConfig, clear: bool = True) -> Path:
    """Create the run folder (checking it can be written). One that already holds a run is an error, unless this
    run resumes it or `overwrite` is set: then the old run's outputs, and only those, are deleted — by the caller
    with `clear` (rank 0; the other processes only check)."""
    run_dir = Path(cfg.output)
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if found and not cfg.resume:
        if not cfg.overwrite:
            raise MiniloraError(f"--output {run_dir} already holds a run ({', '.join(found)}): continue it with "
                                "--resume, replace it with --overwrite, or choose another --output")
        for name in found if clear else ():
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return files.ensure_writable_dir(run_dir, "output folder (--output)")


def save_weights(model, out_dir: Path, cfg: TrainConfig, tokenizer_dir: str) -> None:
    """The trained result: a PEFT adapter (LoRA/QLoRA) or a full Hugging Face checkpoint (full FT)."""
    if cfg.method == "full":
        from .formats import save_companion_files, save_model

        save_model(model, out_dir)
        save_companion_files(tokenizer_dir, out_dir)  # a GGUF base: its tokenizer written out as files
    else:
        from .adapter import save_adapter

        save_adapter(model, out_dir, base_model_name_or_path=str(cfg.model))
        if cfg.method in ("qlora", "qdora"):  # so merging can say how far a 16-bit merge is from the trained model
            files.write_json(out_dir / TRAINED_ON, {"base_quantization": "nf4", "blocksize": 64, "double_quant": True})


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig) -> Path:
    """Write checkpoints/step-NNNNNN atomically: build it in a temporary folder, then rename it.
    Every rank calls it (the gathering is collective); rank 0 writes. An OSError (full disk, read-only folder) is
    a MiniloraError naming the path and the last checkpoint, which is left as it was."""
    optimizer_state = distributed.full_optimizer_state(optimizer)
    distributed.barrier()  # a checkpoint is written only if every rank reached it (a dead rank stops the run here)
    with distributed.full_trainable_parameters(distributed.unwrap(model)) as whole:
        final = _write_checkpoint(run_dir, step, whole, optimizer_state, scheduler, cfg) if distributed.is_main() \
            else run_dir / CHECKPOINTS / f"step-{step:06d}"
    distributed.barrier()  # no rank runs ahead of a checkpoint that is not written yet
    return final


def _write_checkpoint(run_dir: Path, step: int, model, optimizer_state: dict, scheduler, cfg: TrainConfig) -> Path:
    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    tmp = run_dir / CHECKPOINTS / f".step-{step:06d}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(model, tmp, cfg, cfg.model)
        state = {
            "step": step,  # the data position is a function of the step (see Batches)
            "global_batch": [distributed.world_size(), cfg.batch_size],  # processes × per-process batch
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(state, tmp / "trainer_state.pt")
        files.write_json(tmp / MANIFEST, {"step": step, "files": {
            f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file() and f.name != MANIFEST}})
        files.fsync_tree(tmp)
        publish(tmp, final)
        files.write_text(run_dir / CHECKPOINTS / "latest", final.name + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MiniloraError(f"cannot write checkpoint {final}: {files.os_error_message(e)}; "
                            f"{last_checkpoint_note(run_dir)}") from None
    return final


def save_result(model, result_dir: Path, run_dir: Path, cfg: TrainConfig) -> None:
    """The run's result (run/adapter or run/model), built beside it and published like a checkpoint, so a full disk
    leaves the previous result whole rather than a folder with half its files."""
    tmp = result_dir.with_name(f".{result_dir.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(model, tmp, cfg, cfg.model)
        files.fsync_tree(tmp)
        publish(tmp, result_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MiniloraError(f"cannot write the result {result_dir}: {files.os_error_message(e)}; "
                            f"{last_checkpoint_note(run_dir)}") from None


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`. An existing `final` is renamed aside first and deleted only
    once the new one is in place, so at every moment one complete copy exists (see find_checkpoint)."""
    aside = final.with_name(f".{final.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        final.rename(aside)
    tmp.rename(final)
    files.fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def last_checkpoint_note(run_dir: Path) -> str:
    """What a user needs after a failed write: which checkpoint is intact, and how to continue from it."""
    pointer = Path(run_dir) / CHECKPOINTS / "latest"
    try:
        name = pointer.read_text().strip()
    except OSError:
        return "no checkpoint of this run had been written yet (nothing to lose)"
    return f"the last checkpoint, {pointer.parent / name}, is intact: fix this and continue with --resume"


def incomplete(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (a short reason), or None when it is one.

    Complete: every file its manifest lists is there with its size. Checkpoints of older minilora versions have
    no manifest; they are complete when trainer_state.pt and the weights are there."""
    if not path.is_dir():
        return "does not exist"
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            listed = {str(k): int(v) for k, v in listed.items()}
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            return f"has an unreadable {MANIFEST}"
    else:
        weights = ["adapter_model.safetensors", "adapter_config.json"] if (path / "adapter_config.json").is_file() \
            else ["config.json"] + (["model.safetensors.index.json"] if (path / "model.safetensors.index.json")
                                    .is_file() else ["model.safetensors"])
        listed = {name: None for name in ["trainer_state.pt", *weights]}
    for name, size in listed.items():
        f = path / name
        if not f.is_file():
            return f"is missing {name}"
        if size is not None and f.stat().st_size != size:
            return f"has a cut-short {name} ({f.stat().st_size:,} of {size:,} bytes)"
    return None


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, newest step first (a published one before a set-aside one)."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = _NAME.match(path.name)
        if match and incomplete(path) is None:
            found.append((int(match.group(1) or match.group(2)), match.group(1) is not None, path))
    return [path for _, _, path in sorted(found, reverse=True)]


def _pointer(run_dir: Path, name: str) -> str | None:
    pointer = run_dir / CHECKPOINTS / name
    return pointer.read_text().strip() if pointer.is_file() else None


def mark_best(run_dir: Path, step: int) -> None:
    """Point checkpoints/best at step-NNNNNN (written atomically, like `latest`)."""
    files.write_text(run_dir / CHECKPOINTS / "best", f"step-{step:06d}\n")


def best_checkpoint(run_dir: Path) -> Path | None:
    name = _pointer(run_dir, "best")
    return None if name is None else run_dir / CHECKPOINTS / name


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step folders (keep 0 = keep all); never the ones `latest` and `best`
    name. Returns the deleted folders."""
    if keep == 0:
        return []
    steps = sorted((run_dir / CHECKPOINTS).glob("step-*"))  # zero-padded: name order = step order
    protected = {_pointer(run_dir, "latest"), _pointer(run_dir, "best")}
    doomed = [p for p in steps[:-keep] if p.name not in protected]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


@dataclass
class Best:
    """The lowest validation loss after step 0, its step, and the evaluations since then (for --patience)."""

    loss: float = math.inf
    step: int | None = None
    stale: int = 0

    def update(self, step: int, val_loss: float) -> bool:
        """Record an evaluation; True when it is a new best."""
        if val_loss < self.loss:
            self.loss, self.step, self.stale = val_loss, step, 0
            return True
        self.stale += 1
        return False

    @classmethod
    def from_records(cls, records: list[dict]) -> "Best":
        """Replay a resumed run's metrics records."""
        best = cls()
        for r in records:
            if "val_loss" in r and r["step"] > 0:
                best.update(r["step"], r["val_loss"])
        return best


def export_checkpoint(checkpoint: Path, out_dir: Path) -> None:
    """Copy a checkpoint's weights (adapter or full model, not the trainer state) to the run's result folder."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns("trainer_state.pt", MANIFEST))
    files.fsync_tree(tmp)
    publish(tmp, out_dir)  # the previous result stays whole until the new one is in place


def find_checkpoint(cfg: TrainConfig) -> Path:
    """The checkpoint --resume names; for "latest", the one `latest` names or, when that one is missing or
    incomplete, the newest complete checkpoint (with a note saying so)."""
    if cfg.resume != "latest":
        path = Path(cfg.resume)
        if not path.is_dir():
            raise MiniloraError(f"--resume: checkpoint folder {path} not found")
        if not (path / "trainer_state.pt").is_file() and not (path / MANIFEST).is_file():
            raise MiniloraError(f"--resume: {path} is not a minilora checkpoint (no trainer_state.pt)")
        problem = incomplete(path)
        if problem:
            others = complete_checkpoints(path.parent)
            hint = f"; the newest complete one there is {others[0]}" if others else ""
            raise MiniloraError(f"--resume: checkpoint {path} {problem} (incomplete){hint}")
        return path
    folder = Path(cfg.output) / CHECKPOINTS
    pointer = folder / "latest"
    named = folder / pointer.read_text().strip() if pointer.is_file() else None
    problem = incomplete(named) if named is not None else "latest is missing"
    if problem is None:
        return named
    candidates = complete_checkpoints(folder)
    why = f"{named} {problem}" if named is not None else f"{pointer} is missing"
    if not candidates:
        raise MiniloraError(f"--resume: no complete checkpoint in {folder} ({why}); nothing to resume from: "
                            "start without --resume")
    print(f"note: {why} (incomplete); resuming from the newest complete checkpoint, {candidates[0]}")
    return candidates[0]


def load_lora_weights(model, checkpoint: Path) -> None:
    """Copy a checkpoint's A and B into the model's existing LoRA layers (same names, same shapes)."""
    from safetensors.torch import load_file

    from .adapter import adapter_state_dict

    ours = adapter_state_dict(model)  # PEFT key -> tensor of the live model
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    if set(saved) != set(ours):
        raise MiniloraError(f"{checkpoint}: its LoRA tensors do not match this run's (different --targets or --r?)")
    with torch.no_grad():
        for key, tensor in saved.items():
            distributed.copy_full_(ours[key], tensor)  # an FSDP2 shard takes its part


def load_weights(model, path: Path, cfg: TrainConfig) -> None:
    """Load a checkpoint's trained weights into the model: every weight (full FT) or the LoRA A and B."""
    from safetensors.torch import load_file

    model = distributed.unwrap(model)
    weights_file = "model.safetensors" if cfg.method == "full" else "adapter_model.safetensors"
    if not (path / weights_file).is_file():
        raise MiniloraError(f"--resume: {path} holds no {weights_file}: it was saved by a run with another "
                            f"--method than this one ({cfg.method}), or it is incomplete")
    if cfg.method == "full":
        weights = load_file(str(path / "model.safetensors"))
        unexpected = distributed.load_full_weights(model, weights)  # FSDP2: each rank its shards
        if unexpected:
            raise MiniloraError(f"{path}/model.safetensors has unexpected tensors: {unexpected[:5]}")
    else:
        load_lora_weights(model, path)


def restore_checkpoint(path: Path, model, optimizer, scheduler, cfg: TrainConfig) -> int:
    """Load weights, optimizer, scheduler and RNG; return the step to continue from."""
    load_weights(model, path, cfg)
    try:
        state = torch.load(path / "trainer_state.pt", weights_only=False)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise MiniloraError(f"--resume: {path}/trainer_state.pt is corrupt ({type(e).__name__}); resume from an "
                            "earlier checkpoint: --resume PATH") from None
    saved_world, saved_batch = state.get("global_batch", (1, cfg.batch_size))
    world = distributed.world_size()
    if saved_world != world and saved_world * saved_batch != world * cfg.batch_size:
        raise MiniloraError(f"{path} was trained by {saved_world} process(es) × --batch-size {saved_batch}; with "
                            f"{world} process(es) use --batch-size {saved_world * saved_batch / world:g} "
                            f"to keep the global batch")
    distributed.load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The optimizer's saved lr is the old schedule's: with a new --max-steps (cosine over a new length), the first
    # resumed step must already take this run's value, as an uninterrupted run would.
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])
