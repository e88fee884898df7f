"""What a training run reports: metrics.jsonl and the loss chart, the progress line, and before/after samples.

metrics.jsonl is the record; loss.svg draws it (loss over learning rate); `--log tensorboard` sends the same
scalars to TensorBoard through torch.utils.tensorboard (the tensorboard package is an optional extra)."""

import json
from pathlib import Path

import torch

from . import files
from .errors import MiniloraError
from .train_config import TrainConfig


class Metrics:
    """metrics.jsonl (one JSON object per record, the run's record) and the chart loss.svg in the run folder;
    with `tensorboard=True` the same scalars also go to TensorBoard event files in run/tensorboard."""

    def __init__(self, run_dir: Path, resume_step: int | None, title: str = "minilora", tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.title = title  # of the chart: e.g. "my-run: base fine-tuning, lora"
        self.records = []
        if resume_step is not None and self.path.exists():  # drop what came after the checkpoint
            lines = self.path.read_text(encoding="utf-8").splitlines()
            self.records = [r for r in map(json.loads, lines) if r["step"] <= resume_step]
        files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.writer = tensorboard_writer(run_dir / "tensorboard", (resume_step or 0) + 1) if tensorboard else None

    def log(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def plot(self) -> Path:
        """loss.svg: train and validation loss per step, over a panel with the learning rate."""
        from .plot import panel_chart

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        lr = [(r["step"], r["lr"]) for r in self.records if "lr" in r]
        return panel_chart([({"train loss": train, "validation loss": val}, "loss (nats/token)", False),
                            ({"learning rate": lr}, "learning rate", False)],
                           self.path.parent / "loss.svg", title=self.title, xlabel="optimizer step")


def require_tensorboard():
    """torch.utils.tensorboard's SummaryWriter, or a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MiniloraError("--log tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or pip install 'minilora[tensorboard]'); metrics.jsonl is written either way") from None
    return SummaryWriter


def tensorboard_writer(folder: Path, purge_step: int):
    """A TensorBoard writer that first drops the events after a resumed step (they are redone)."""
    return require_tensorboard()(log_dir=str(folder), purge_step=purge_step)


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
