"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    run/checkpoints/step-NNNNNN/   adapter_model.safetensors + adapter_config.json (LoRA/QLoRA)
                                   or model.safetensors + config.json + tokenizer files (full FT)
                                   trainer_state.pt: step, optimizer, scheduler, RNG states
    run/checkpoints/latest         the name of the newest complete checkpoint
    run/checkpoints/best           with --save-best: the name of the checkpoint with the lowest validation loss

A checkpoint is built in a temporary folder and renamed into place, then `latest` is rewritten atomically, so a
run killed at any moment leaves `latest` naming a complete checkpoint. The data position is not stored: it is a
function of the step (train_data.Batches), so restoring the step restores the batches.

Also here, the run folder's life cycle: a folder that holds a run is refused unless the run is resumed or
`--overwrite` is given (two runs in one folder mix their checkpoints); only the newest `--keep-checkpoints`
checkpoints stay (never the ones `latest` and `best` name); `Best` follows the lowest validation loss for
`--save-best` and `--patience`.
"""

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import files
from .errors import MiniloraError
from .train_config import TrainConfig

CHECKPOINTS = "checkpoints"
TRAINED_ON = "minilora_base.json"  # beside a QLoRA adapter: its base was 4-bit NF4 (merge.py reads it)
RUN_OUTPUTS = ("config.toml", "metrics.jsonl", "loss.svg", CHECKPOINTS, "adapter", "model", "tensorboard")


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run folder. One that already holds a run is an error, unless this run resumes it or
    `overwrite` is set (then the old run's outputs, and only those, are deleted)."""
    run_dir = Path(cfg.output)
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if found and not cfg.resume:
        if not cfg.overwrite:
            raise MiniloraError(f"--output {run_dir} already holds a run ({', '.join(found)}): continue it with "
                                "--resume, replace it with --overwrite, or choose another --output")
        for name in found:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_weights(model, out_dir: Path, cfg: TrainConfig, tokenizer_dir: str) -> None:
    """The trained result: a PEFT adapter (LoRA/QLoRA) or a full Hugging Face checkpoint (full FT)."""
    if cfg.method == "full":
        from .formats.safetensors_folder import save_model

        save_model(model, out_dir)
        files.copy_companion_files(tokenizer_dir, out_dir)
    else:
        from .adapter import save_adapter

        save_adapter(model, out_dir, base_model_name_or_path=str(cfg.model))
        if cfg.method in ("qlora", "qdora"):  # so merging can say how far a 16-bit merge is from the trained model
            files.write_json(out_dir / TRAINED_ON, {"base_quantization": "nf4", "blocksize": 64, "double_quant": True})


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig) -> Path:
    """Write checkpoints/step-NNNNNN atomically: build it in a temporary folder, then rename it."""
    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    tmp = run_dir / CHECKPOINTS / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp, cfg, cfg.model)
    state = {
        "step": step,  # the data position is a function of the step (see Batches)
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    files.write_text(run_dir / CHECKPOINTS / "latest", final.name + "\n")
    return final


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
    shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns("trainer_state.pt"))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def find_checkpoint(cfg: TrainConfig) -> Path:
    if cfg.resume != "latest":
        path = Path(cfg.resume)
    else:
        pointer = Path(cfg.output) / CHECKPOINTS / "latest"
        if not pointer.is_file():
            raise MiniloraError(f"--resume: no checkpoint in {pointer.parent} (nothing to resume from)")
        path = pointer.parent / pointer.read_text().strip()
    if not (path / "trainer_state.pt").is_file():
        raise MiniloraError(f"--resume: {path} is not a minilora checkpoint (no trainer_state.pt)")
    return path


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
            ours[key].copy_(tensor)


def load_weights(model, path: Path, cfg: TrainConfig) -> None:
    """Load a checkpoint's trained weights into the model: every weight (full FT) or the LoRA A and B."""
    from safetensors.torch import load_file

    if cfg.method == "full":
        weights = load_file(str(path / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise MiniloraError(f"{path}/model.safetensors has unexpected tensors: {unexpected[:5]}")
    else:
        load_lora_weights(model, path)


def restore_checkpoint(path: Path, model, optimizer, scheduler, cfg: TrainConfig) -> int:
    """Load weights, optimizer, scheduler and RNG; return the step to continue from."""
    load_weights(model, path, cfg)
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The optimizer's saved lr is the old schedule's: with a new --max-steps (cosine over a new length), the first
    # resumed step must already take this run's value, as an uninterrupted run would.
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])
