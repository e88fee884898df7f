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
    with `tensorboard=True` the same scalars also go to TensorBoard event files in run/tensorboard.

    Records are appended as they come, so a kill or a full disk can leave a torn last line: on --resume, lines
    that are not a complete record are dropped (with a note), the complete ones kept."""

    def __init__(self, run_dir: Path, resume_step: int | None, write: bool = True, title: str = "minilora",
                 tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.write = write  # False on ranks other than 0: records are kept, no file is touched
        self.title = title  # of the chart: e.g. "my-run: base fine-tuning, lora"
        self.records = []
        if resume_step is not None and self.path.exists():  # drop what came after the checkpoint
            self.records = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        self._write_all()
        self.writer = tensorboard_writer(run_dir / "tensorboard", (resume_step or 0) + 1) \
            if tensorboard and write else None

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not self.write:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise MiniloraError(f"cannot append to {files.os_error_message(e)}") from None
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def log_final(self, record: dict) -> None:
        """The run's final evaluation: replaces one an earlier, finished run wrote for the same step (resuming a
        completed run evaluates again), so metrics.jsonl never holds two final records."""
        is_final = lambda r: r["step"] == record["step"] and "val_loss" in r and "loss" not in r  # noqa: E731
        if any(map(is_final, self.records)):
            self.records = [r for r in self.records if not is_final(r)] + [record]
            self._write_all()
        else:
            self.log(record)

    def _write_all(self) -> None:
        if not self.write:
            return
        try:
            files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        except OSError as e:
            raise MiniloraError(f"cannot write {files.os_error_message(e)}") from None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def plot(self) -> Path:
        """loss.svg: train and validation loss per step, over a panel with the learning rate."""
        from .plot import panel_chart

        if not self.write:
            return self.path.parent / "loss.svg"
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


def read_metrics(path: Path) -> list[dict]:
    """The complete records of a metrics.jsonl; a torn or foreign line (a kill mid-append) is left out."""
    records, dropped = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif line.strip():
            dropped.append(lineno)
    if dropped:
        print(f"note: {path}: dropped {len(dropped)} incomplete line(s) (line {', '.join(map(str, dropped[:5]))}): "
              "a run killed while appending leaves a torn last line")
    return records


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
    from .packed_weights import release_packed

    model.eval()
    try:
        return [sample_one(model, tokenizer, prompt, cfg, device) for prompt in prompts]
    finally:  # generate keeps packed copies of the weights for its next call (packed_weights.py); training runs
        release_packed(model)  # many steps before the next samples, so here they would only hold memory


def sample_one(model, tokenizer, prompt: str, cfg: TrainConfig, device: torch.device) -> str:
    """One prompt's greedy continuation (sft: the assistant's reply to it as a user turn)."""
    from .chat import chat_once
    from .generation import generate

    if cfg.mode == "sft":
        reply = chat_once(model, tokenizer, [{"role": "user", "content": prompt}], cfg.sample_tokens)
        cut = "" if reply.stopped else f" [… no end of turn within {cfg.sample_tokens} tokens]"
        return f"user: {prompt}\nassistant: {reply.text}{cut}"
    ids = torch.tensor([tokenizer.encode(prompt)], device=device)
    out = generate(model, ids, max_new_tokens=cfg.sample_tokens, temperature=0.0,
                   eos_token_ids=tokenizer.eos_token_ids)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def print_samples(title: str, texts: list[str]) -> None:
    print(f"\n--- {title} ---")
    for t in texts:
        print("  " + t.replace("\n", "\n  "))
    print()
