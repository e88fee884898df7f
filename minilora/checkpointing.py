"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    run/checkpoints/step-NNNNNN/   adapter_model.safetensors + adapter_config.json (LoRA/QLoRA)
                                   or model.safetensors + config.json + tokenizer files (full FT)
                                   trainer_state.pt: step, optimizer, scheduler, RNG states
    run/checkpoints/latest         the name of the newest complete checkpoint

A checkpoint is built in a temporary folder and renamed into place, then `latest` is rewritten atomically, so a
run killed at any moment leaves `latest` naming a complete checkpoint. The data position is not stored: it is a
function of the step (train_data.Batches), so restoring the step restores the batches.

With many processes every rank takes part in gathering the full weights and optimizer state (FSDP2 shards them),
rank 0 alone writes, and the files are those of one process: a checkpoint resumes with any number of processes,
as long as processes × --batch-size (the global batch) stays the same.
"""

import shutil
from pathlib import Path

import torch

from . import distributed, files
from .errors import MiniloraError
from .train_config import TrainConfig

CHECKPOINTS = "checkpoints"


def save_weights(model, out_dir: Path, cfg: TrainConfig, tokenizer_dir: str) -> None:
    """The trained result: a PEFT adapter (LoRA/QLoRA) or a full Hugging Face checkpoint (full FT)."""
    if cfg.method == "full":
        from .formats.safetensors_folder import save_model

        save_model(model, out_dir)
        files.copy_companion_files(tokenizer_dir, out_dir)
    else:
        from .adapter import save_adapter

        save_adapter(model, out_dir, base_model_name_or_path=str(cfg.model))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig) -> Path:
    """Write checkpoints/step-NNNNNN atomically: build it in a temporary folder, then rename it.
    Every rank calls it (the gathering is collective); rank 0 writes."""
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
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    files.write_text(run_dir / CHECKPOINTS / "latest", final.name + "\n")
    return final


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
            distributed.copy_full_(ours[key], tensor)  # an FSDP2 shard takes its part


def restore_checkpoint(path: Path, model, optimizer, scheduler, cfg: TrainConfig) -> int:
    """Load weights, optimizer, scheduler and RNG; return the step to continue from."""
    from safetensors.torch import load_file

    model = distributed.unwrap(model)
    if cfg.method == "full":
        weights = load_file(str(path / "model.safetensors"))
        unexpected = distributed.load_full_weights(model, weights)  # FSDP2: each rank its shards
        if unexpected:
            raise MiniloraError(f"{path}/model.safetensors has unexpected tensors: {unexpected[:5]}")
    else:
        load_lora_weights(model, path)
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    saved_world, saved_batch = state.get("global_batch", (1, cfg.batch_size))
    world = distributed.world_size()
    if saved_world != world and saved_world * saved_batch != world * cfg.batch_size:
        raise MiniloraError(f"{path} was trained by {saved_world} process(es) × --batch-size {saved_batch}; with "
                            f"{world} process(es) use --batch-size {saved_world * saved_batch / world:g} "
                            f"to keep the global batch")
    distributed.load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])
