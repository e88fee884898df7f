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
        --save-best: also at each new best validation loss; --patience: stop when none comes; keep the newest N

Why the loss is normalised per step and not per micro-batch: with micro-batches of unequal token counts,
averaging their means would weight a short batch's tokens more than a long one's. Summing and dividing by
the step's total makes N micro-batches give exactly the gradient of one big batch.

The data order is a seeded permutation per epoch, so the data position is a pure function of the step:
resuming restores model, optimizer, scheduler and RNG, then continues with the very same batches and losses.

Checkpoints live in checkpointing.py, metrics, progress and samples in progress.py.

Many processes (`torchrun --nproc-per-node N -m minilora.train ...`): DDP, or FSDP2 with --fsdp; each rank takes
its slice of every global batch, the token count is summed over ranks, and rank 0 alone prints and writes, so N
processes compute the steps of one process on N × batch_size samples (distributed.py).

Deliberately not handled: tensor / pipeline parallelism, mixed adapters, streaming datasets larger than memory.
"""

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import distributed, files
from .checkpointing import (Best, best_checkpoint, export_checkpoint, find_checkpoint, last_checkpoint_note,
                            load_weights, mark_best, prepare_run_dir, prune_checkpoints, restore_checkpoint,
                            save_checkpoint, save_result)
from .errors import MiniloraError
from .progress import Metrics, print_samples, progress_line, require_tensorboard, sample
from .train_config import TrainConfig
from .train_data import Batches, build_datasets


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
    from .tokenizer import check_fits_embedding, load_tokenizer

    weight_dtype = torch.float32 if cfg.method == "full" else getattr(torch, cfg.dtype)
    quantize = "nf4" if cfg.method in ("qlora", "qdora") else None
    # FSDP2 QLoRA: each rank loads only its rows of the 4-bit base (not QDoRA: its magnitude init needs all of W0)
    shard = (distributed.rank(), distributed.world_size()) \
        if cfg.fsdp and cfg.method == "qlora" and distributed.world_size() > 1 else None
    model = load_model(cfg.model, dtype=weight_dtype, device=device, quantize=quantize,
                       quant_backend=cfg.quant_backend, shard=shard) if quantize else \
        load_model(cfg.model, dtype=weight_dtype, device=device)
    print(memory_summary(model))  # QLoRA: the 4-bit linears at ~4.127 bits per weight
    tokenizer = load_tokenizer(cfg.model)
    check_fits_embedding(tokenizer, model.config.vocab_size, cfg.model)
    return model, tokenizer


def prepare_parameters(model: torch.nn.Module, cfg: TrainConfig) -> list[str]:
    """Make exactly the parameters that should learn require grad; return the LoRA-wrapped module names."""
    from .dora import DoRALinear
    from .lora import LoRALinear, apply_lora, parameter_summary

    wrapped = []
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        layer = DoRALinear if cfg.method in ("dora", "qdora") else LoRALinear
        wrapped = apply_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                             targets=cfg.target_list, use_rslora=cfg.use_rslora, layer=layer)
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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=True if use_fused_adamw(decay + no_decay) else None)


def use_fused_adamw(params) -> bool:
    """The fused AdamW kernel updates each parameter in one pass over its memory. On CUDA that is one launch
    instead of ~10 per tensor; on the CPU one loop instead of the foreach path's ~10 passes over p, grad, m and v:
    20 ms against 145 ms per step for 35M float32 parameters (1 thread, CPU time), within 1.2e-7 of it. The same
    math; transformers' Trainer defaults to it too (optim "adamw_torch_fused" from torch 2.8)."""
    return bool(params) and len({p.device.type for p in params}) == 1 and params[0].device.type in ("cuda", "cpu")


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
    core = distributed.unwrap(model)  # the Transformer inside a DDP wrapper
    return chunked_next_token_loss(hidden.float(), core.lm_head_weight, batch["labels"],
                                   softcap=core.config.final_logit_softcap)


def train_step(model, optimizer, scheduler, micro_batches: list[dict], cfg, device) -> dict:
    """One optimiser step over `grad_accum` micro-batches; returns the step's mean loss and token count.

    With N processes every count and loss is summed over the ranks, and each rank's loss is multiplied by N because
    DDP / FSDP average gradients over ranks: the result is the gradient of the whole global batch."""
    model.train()
    # CPU labels, one int() each (not one per micro-batch)
    local_tokens = int(sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches))
    local_seen = int(sum(b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel()
                         for b in micro_batches))  # every real token, for tokens/s
    tokens_in_step, seen = distributed.all_reduce_sum(local_tokens, local_seen, device=device)  # over all ranks
    if tokens_in_step == 0:
        raise MiniloraError("a training batch has no tokens to learn from (every label is -100): "
                            "check --train-on-prompt / the chat template, or the data")
    loss_total = torch.zeros((), device=device)  # summed on the device: one host sync per step, not per micro-batch
    for i, batch in enumerate(micro_batches):
        with distributed.gradient_sync(model, sync=i == len(micro_batches) - 1):  # reduce on the last one only
            loss_sum, _ = batch_loss_sum(model, batch, cfg, device)
            (loss_sum / tokens_in_step * distributed.world_size()).backward()
        loss_total += loss_sum.detach()
    (loss_total,) = distributed.all_reduce_sum(loss_total.item(), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    # max_norm inf: no clipping (a scale of exactly 1), but the norm is still measured for check_finite
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_total / tokens_in_step, "tokens": int(tokens_in_step), "seen": int(seen),
            "grad_norm": distributed.grad_norm_value(grad_norm)}


def check_finite(stats: dict, step: int, run_dir: Path) -> None:
    """Stop at the first step whose loss or gradient norm is NaN or infinite: every later step would be NaN too,
    and saving would write a NaN adapter that looks like a result. Nothing of this step is saved. (The loss and
    the norm are the same on every rank, so every rank stops.)"""
    if math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]):
        return
    raise MiniloraError(
        f"step {step}: the training loss is {stats['loss']} and the gradient norm {stats['grad_norm']} (not finite): "
        f"stopped without saving; {last_checkpoint_note(run_dir)}. Likely causes: NaN or inf in the model's "
        "weights, a negative rms_norm_eps in config.json, or too high a learning rate (with float16, try bfloat16)")


@torch.no_grad()
def evaluate(model, val_batches: Batches, cfg, device) -> dict:
    """Token-weighted validation loss over the validation set (or its first eval_batches batches)."""
    model.eval()
    loss_sum = tokens = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host sync per batch
    for i, batch in enumerate(val_batches.epoch(0)):
        if cfg.eval_batches and i >= cfg.eval_batches:
            break
        s, n = batch_loss_sum(model, batch, cfg, device)
        loss_sum, tokens = loss_sum + s, tokens + n
    loss_sum, tokens = distributed.all_reduce_sum(loss_sum.item(), tokens.item(), device=device)  # every rank's
    tokens = int(tokens)
    loss = loss_sum / max(tokens, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Run one fine-tuning job end to end; return the final metrics (also in metrics.jsonl)."""
    if cfg.model is None:
        raise MiniloraError("--model is required when --data is given (a Hugging Face model folder)")
    torch.manual_seed(cfg.seed)  # the same seed on every rank: the same LoRA initialisation everywhere
    device = distributed.init(cfg.device) or pick_device(cfg.device)  # torchrun: cuda:LOCAL_RANK or the CPU
    main = distributed.is_main()  # rank 0 alone writes files (other ranks' prints go to /dev/null)
    # A folder holding another run is refused (unless --resume / --overwrite); only rank 0 clears it.
    run_dir = prepare_run_dir(cfg, clear=main)
    distributed.barrier()  # no rank writes before the folder is ready
    if cfg.log == "tensorboard":
        require_tensorboard()  # before loading anything
    if cfg.threads:  # only when asked: torch's default uses every core
        torch.set_num_threads(cfg.threads)

    model, tokenizer = load_model_and_tokenizer(cfg, device)
    train_set, val_set = build_datasets(cfg, tokenizer, model.config, distributed.rank(), distributed.world_size())
    prepare_parameters(model, cfg)
    model = distributed.wrap_model(model, cfg.fsdp, device)  # DDP / FSDP2 with many processes
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = max(1, len(train_set) // cfg.grad_accum)  # len(train_set) = batches per epoch
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
    unit = "packed rows" if cfg.packing and cfg.mode == "sft" else "samples"
    ranks = f" × {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    print(f"data: {len(train_set.samples)} training / {len(val_set.samples)} validation {unit}; "
          f"{total_steps} steps of {cfg.batch_size}×{cfg.grad_accum}{ranks} samples on {device}")

    start_step = 0
    if cfg.resume:
        checkpoint = find_checkpoint(cfg)
        start_step = restore_checkpoint(checkpoint, model, optimizer, scheduler, cfg)
        print(f"resumed from {checkpoint} at step {start_step}")
    metrics = Metrics(run_dir, start_step if cfg.resume else None, write=main,
                      tensorboard=cfg.log == "tensorboard",
                      title=f"{run_dir.resolve().name}: {cfg.mode} fine-tuning, {cfg.method}")
    best = Best.from_records(metrics.records)  # lowest validation loss so far (--save-best, --patience)
    if main:
        files.write_text(run_dir / "config.toml", cfg.to_toml())
    prompts = [p for p in cfg.sample_prompts.split("|") if p.strip()]
    samplers = main or cfg.fsdp  # FSDP2's forward is a collective: every rank generates, rank 0 prints
    before = sample(distributed.unwrap(model), tokenizer, prompts, cfg, device) \
        if prompts and not cfg.resume and samplers else []
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
            check_finite(stats, step, run_dir)
            done = step
            tokens_seen += stats["seen"]
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
            new_best = "val_loss" in record and best.update(step, record["val_loss"])
            if (cfg.save_every and step % cfg.save_every == 0 or cfg.save_best and new_best) and step != total_steps:
                save_checkpoint(run_dir, step, model, optimizer, scheduler, cfg)
                if main:
                    if cfg.save_best and new_best:
                        mark_best(run_dir, step)
                    prune_checkpoints(run_dir, cfg.keep_checkpoints)
                metrics.plot()
            if cfg.patience and best.stale >= cfg.patience:
                print(f"early stop at step {step}: no better validation loss in {cfg.patience} evaluations "
                      f"(best {best.loss:.4f} at step {best.step})")
                break
    except KeyboardInterrupt:
        if distributed.world_size() > 1:  # Ctrl-C reaches every rank at a different point: no collective save
            print(f"\ninterrupted at step {done}: the newest complete checkpoint in {run_dir / 'checkpoints'} "
                  f"stays `latest`; continue with --resume")
            raise
        print(f"\ninterrupted: saving a checkpoint at step {done} before exiting")
        if done > start_step:
            path = save_checkpoint(run_dir, done, model, optimizer, scheduler, cfg)
            print(f"saved {path}; continue with --resume")
        metrics.plot()
        raise

    final = {"step": done, **evaluate(model, val_set, cfg, device)}
    metrics.log_final(final)
    save_checkpoint(run_dir, done, model, optimizer, scheduler, cfg)
    if best.update(done, final["val_loss"]) and cfg.save_best and main:
        mark_best(run_dir, done)
    if main:
        prune_checkpoints(run_dir, cfg.keep_checkpoints)
    result_dir = run_dir / ("model" if cfg.method == "full" else "adapter")
    if cfg.save_best and best_checkpoint(run_dir) is not None:  # export the best, not the last step
        if main:
            export_checkpoint(best_checkpoint(run_dir), result_dir)
        distributed.barrier()
        load_weights(model, best_checkpoint(run_dir), cfg)  # the samples below show the exported model
        print(f"best validation loss {best.loss:.4f} at step {best.step}: {result_dir} holds that checkpoint")
    else:
        with distributed.full_trainable_parameters(distributed.unwrap(model)) as whole:  # FSDP2: gathered
            if main:
                save_result(whole, result_dir, run_dir, cfg)
    plot_path = metrics.plot()
    metrics.close()
    first_val = next(r["val_loss"] for r in metrics.records if "val_loss" in r)
    print(f"\nvalidation loss {first_val:.4f} → {final['val_loss']:.4f} "
          f"(perplexity {math.exp(min(first_val, 50)):.1f} → {final['val_ppl']:.1f})")
    print(f"saved {result_dir}, metrics {metrics.path}, loss curve {plot_path}")
    if prompts and samplers:
        print_samples("after fine-tuning", sample(distributed.unwrap(model), tokenizer, prompts, cfg, device))
    distributed.close()  # every rank is here: leave the process group cleanly
    return final
