"""The fine-tuning loop, readable top to bottom (the command `python -m minilora.train` sits on top of it).

    model, tokenizer = load(...)                       # a Hugging Face folder, or the built-in default
    train_set, val_set = datasets(...)                 # base: blocks of raw text; sft: chat samples
    prepare(model)                                     # LoRA / QLoRA adapters, or every weight for full FT
    for step in steps:
        for micro_batch in grad_accum micro-batches:   # loss summed over tokens ...
            (loss_sum / tokens_in_step).backward()     # ... and divided by ALL counted tokens of the step
        clip, AdamW, schedule
        every eval_every: validation loss, perplexity
        every save_every: checkpoint (adapter or weights, optimizer, scheduler, RNG, data position)

Why the loss is normalised per step and not per micro-batch: with micro-batches of unequal token counts,
averaging their means would weight a short batch's tokens more than a long one's. Summing and dividing by
the step's total makes N micro-batches give exactly the gradient of one big batch.

The data order is a seeded permutation per epoch, so the data position is a pure function of the step:
resuming restores model, optimizer, scheduler and RNG, then continues with the very same batches and losses.

Deliberately not handled: multi-GPU / distributed training, mixed adapters, streaming datasets larger than
memory.
"""

import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import files
from .errors import MiniloraError
from .train_config import TrainConfig
from .train_data import Batches, build_datasets

CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------------------------------------
# Set-up: device, model, parameters to train
# ----------------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MiniloraError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def load_model_and_tokenizer(cfg: TrainConfig, device: torch.device):
    """Load the base model for training. LoRA/QLoRA keep the frozen base in `dtype` when it is 16-bit;
    full fine-tuning keeps float32 master weights (AdamW on bf16 weights loses small updates)."""
    from .formats.safetensors_folder import load_model
    from .quant.bnb_checkpoint import memory_summary
    from .tokenizer import load_tokenizer

    weight_dtype = torch.float32 if cfg.method == "full" else getattr(torch, cfg.dtype)
    quantize = "nf4" if cfg.method == "qlora" else None
    model = load_model(cfg.model, dtype=weight_dtype, device=device, quantize=quantize,
                       quant_backend=cfg.quant_backend) if quantize else \
        load_model(cfg.model, dtype=weight_dtype, device=device)
    print(memory_summary(model))  # QLoRA: the 4-bit linears at ~4.127 bits per weight
    tokenizer = load_tokenizer(cfg.model)
    return model, tokenizer


def prepare_parameters(model: torch.nn.Module, cfg: TrainConfig) -> list[str]:
    """Make exactly the parameters that should learn require grad; return the LoRA-wrapped module names."""
    from .lora import apply_lora, parameter_summary

    wrapped = []
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        wrapped = apply_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                             targets=cfg.target_list, use_rslora=cfg.use_rslora)
    model.gradient_checkpointing = cfg.grad_checkpointing
    print(parameter_summary(model))
    return wrapped


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only: decaying norm gains or biases towards 0 hurts
    (they are not over-parameterised), so 1-D parameters go in a group with weight_decay = 0."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to 1, then constant or a cosine decay to 0.1 at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------
# One step, one evaluation
# ----------------------------------------------------------------------------------------------------------
def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, cfg.dtype))


def batch_loss_sum(model, batch: dict, cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses over the counted tokens of one micro-batch, and their number.

    The (tokens × vocab) logits are never materialised: the loss is computed in chunks from the final
    hidden states (see loss.py)."""
    from .loss import chunked_next_token_loss

    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast(cfg, device):
        hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), segment_ids=batch.get("segment_ids"),
                       return_hidden=True)  # (B, T, C)
    return chunked_next_token_loss(hidden.float(), model.lm_head_weight, batch["labels"],
                                   softcap=model.config.final_logit_softcap)


def train_step(model, optimizer, scheduler, micro_batches: list[dict], cfg, device) -> dict:
    """One optimiser step over `grad_accum` micro-batches; returns the step's mean loss and token count."""
    model.train()
    tokens_in_step = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    if tokens_in_step == 0:
        raise MiniloraError("a training batch has no tokens to learn from (every label is -100): "
                            "check --train-on-prompt / the chat template, or the data")
    loss_total = 0.0
    for batch in micro_batches:
        loss_sum, _ = batch_loss_sum(model, batch, cfg, device)
        (loss_sum / tokens_in_step).backward()
        loss_total += loss_sum.item()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_total / tokens_in_step, "tokens": tokens_in_step,
            "grad_norm": None if grad_norm is None else float(grad_norm)}


@torch.no_grad()
def evaluate(model, val_batches: Batches, cfg, device) -> dict:
    """Token-weighted validation loss over the validation set (or its first eval_batches batches)."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    for i, batch in enumerate(val_batches.epoch(0)):
        if cfg.eval_batches and i >= cfg.eval_batches:
            break
        s, n = batch_loss_sum(model, batch, cfg, device)
        loss_sum, tokens = loss_sum + s.item(), tokens + int(n)
    loss = loss_sum / max(tokens, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue exactly where we stopped
# ----------------------------------------------------------------------------------------------------------
def save_weights(model, out_dir: Path, cfg: TrainConfig, tokenizer_dir: str) -> None:
    """The trained result: a PEFT adapter (LoRA/QLoRA) or a full Hugging Face checkpoint (full FT)."""
    if cfg.method == "full":
        from .formats.safetensors_folder import save_model

        save_model(model, out_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json", "chat_template.jinja"):
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    else:
        from .adapter import save_adapter

        save_adapter(model, out_dir, base_model_name_or_path=str(cfg.model))


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


def restore_checkpoint(path: Path, model, optimizer, scheduler, cfg: TrainConfig) -> int:
    """Load weights, optimizer, scheduler and RNG; return the step to continue from."""
    from safetensors.torch import load_file

    if cfg.method == "full":
        weights = load_file(str(path / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise MiniloraError(f"{path}/model.safetensors has unexpected tensors: {unexpected[:5]}")
    else:
        load_lora_weights(model, path)
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------------------------
# Metrics, progress, samples
# ----------------------------------------------------------------------------------------------------------
class Metrics:
    """metrics.jsonl (one JSON object per record) and the loss-curve picture loss.svg in the run folder."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.records = []
        if resume_step is not None and self.path.exists():  # drop what came after the checkpoint
            lines = self.path.read_text(encoding="utf-8").splitlines()
            self.records = [r for r in map(json.loads, lines) if r["step"] <= resume_step]
        files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> Path:
        from .plot import line_chart

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        return line_chart({"train loss": train, "validation loss": val}, self.path.parent / "loss.svg",
                          title="minilora: loss per step", xlabel="optimizer step", ylabel="loss (nats/token)")


def progress_line(step: int, total: int, stats: dict, lr: float, tokens_per_s: float, eta_s: float) -> str:
    width = 24
    done = int(width * step / total)
    bar = "█" * done + "·" * (width - done)
    eta = f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s"
    return (f"[{bar}] step {step}/{total}  loss {stats['loss']:.4f}  lr {lr:.2e}  "
            f"{tokens_per_s:,.0f} tok/s  ETA {eta}")


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], cfg: TrainConfig, device: torch.device) -> list[str]:
    """Greedy continuations of each prompt (deterministic, so before/after are comparable).

    In sft mode each prompt is a user turn rendered through the chat template, and the reply ends at the
    template's end-of-turn token (a reply that never reaches it is marked: learning to stop is part of SFT);
    in base mode the prompt is raw text to continue."""
    from .chat import chat_once
    from .generation import generate

    model.eval()
    texts = []
    for prompt in prompts:
        if cfg.mode == "sft":
            reply = chat_once(model, tokenizer, [{"role": "user", "content": prompt}], cfg.sample_tokens)
            cut = "" if reply.stopped else f" [… no end of turn within {cfg.sample_tokens} tokens]"
            texts.append(f"user: {prompt}\nassistant: {reply.text}{cut}")
            continue
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        out = generate(model, ids, max_new_tokens=cfg.sample_tokens, temperature=0.0,
                       eos_token_ids=tokenizer.eos_token_ids)
        texts.append(prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    return texts


def print_samples(title: str, texts: list[str]) -> None:
    print(f"\n--- {title} ---")
    for t in texts:
        print("  " + t.replace("\n", "\n  "))
    print()


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Run one fine-tuning job end to end; return the final metrics (also in metrics.jsonl)."""
    if cfg.model is None:
        raise MiniloraError("--model is required when --data is given (a Hugging Face model folder)")
    run_dir = Path(cfg.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)

    model, tokenizer = load_model_and_tokenizer(cfg, device)
    train_set, val_set = build_datasets(cfg, tokenizer, model.config)
    prepare_parameters(model, cfg)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = max(1, len(train_set) // cfg.grad_accum)  # len(train_set) = batches per epoch
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
    unit = "packed rows" if cfg.packing and cfg.mode == "sft" else "samples"
    print(f"data: {len(train_set.samples)} training / {len(val_set.samples)} validation {unit}; "
          f"{total_steps} steps of {cfg.batch_size}×{cfg.grad_accum} samples on {device}")

    start_step = 0
    if cfg.resume:
        checkpoint = find_checkpoint(cfg)
        start_step = restore_checkpoint(checkpoint, model, optimizer, scheduler, cfg)
        print(f"resumed from {checkpoint} at step {start_step}")
    metrics = Metrics(run_dir, start_step if cfg.resume else None)
    files.write_text(run_dir / "config.toml", cfg.to_toml())
    prompts = [p for p in cfg.sample_prompts.split("|") if p.strip()]
    before = sample(model, tokenizer, prompts, cfg, device) if prompts and not cfg.resume else []
    if before:
        print_samples("before fine-tuning", before)
    if not cfg.resume:
        metrics.log({"step": 0, **evaluate(model, val_set, cfg, device)})
        print(f"step 0: validation loss {metrics.records[-1]['val_loss']:.4f}")

    done, t_start, tokens_seen = start_step, time.time(), 0  # done = last completed optimiser step
    interactive = sys.stdout.isatty()
    try:
        for step in range(start_step + 1, total_steps + 1):
            micro = train_set.micro_batches(step - 1, cfg.grad_accum)
            stats = train_step(model, optimizer, scheduler, micro, cfg, device)
            done = step
            tokens_seen += sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                               else b["input_ids"].numel() for b in micro)
            elapsed = time.time() - t_start
            record = {"step": step, "loss": stats["loss"], "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "grad_norm": stats["grad_norm"]}
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
                record.update(evaluate(model, val_set, cfg, device))
            if step % cfg.log_every == 0 or "val_loss" in record or step == total_steps:
                metrics.log(record)
                eta = elapsed / (step - start_step) * (total_steps - step)
                line = progress_line(step, total_steps, stats, record["lr"], record["tokens_per_s"], eta)
                if "val_loss" in record:
                    line += f"  val {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})"
                print(("\r" + line) if interactive and "val_loss" not in record else line,
                      end="" if interactive and "val_loss" not in record else "\n", flush=True)
            if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
                save_checkpoint(run_dir, step, model, optimizer, scheduler, cfg)
                metrics.plot()
    except KeyboardInterrupt:
        print(f"\ninterrupted: saving a checkpoint at step {done} before exiting")
        if done > start_step:
            path = save_checkpoint(run_dir, done, model, optimizer, scheduler, cfg)
            print(f"saved {path}; continue with --resume")
        metrics.plot()
        raise

    final = {"step": total_steps, **evaluate(model, val_set, cfg, device)}
    metrics.log(final)
    save_checkpoint(run_dir, total_steps, model, optimizer, scheduler, cfg)
    result_dir = run_dir / ("model" if cfg.method == "full" else "adapter")
    shutil.rmtree(result_dir, ignore_errors=True)
    save_weights(model, result_dir, cfg, cfg.model)
    plot_path = metrics.plot()
    first_val = next(r["val_loss"] for r in metrics.records if "val_loss" in r)
    print(f"\nvalidation loss {first_val:.4f} → {final['val_loss']:.4f} "
          f"(perplexity {math.exp(min(first_val, 50)):.1f} → {final['val_ppl']:.1f})")
    print(f"saved {result_dir}, metrics {metrics.path}, loss curve {plot_path}")
    if prompts:
        print_samples("after fine-tuning", sample(model, tokenizer, prompts, cfg, device))
    return final
