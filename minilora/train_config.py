"""The training run's configuration: one dataclass, its command-line flags, and optional TOML files.

Why one flat dataclass: every knob of a run is in one place with a comment, the CLI maps one-to-one onto its
fields (`--block-size` ↔ `block_size`), a TOML file may set any of them, and the resolved values are saved in
the run folder (`config.toml`) so a run can be reproduced. Precedence: defaults < TOML file < flags.

Checks live in `__post_init__` so a mistake (batch size 0, unknown method) is one clear line before anything
is loaded.
"""

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import get_type_hints

from .config import SUPPORTED_DTYPES
from .errors import MiniloraError


@dataclass
class TrainConfig:
    # --- what to train ---------------------------------------------------------------------------------------
    model: str | None = None  # Hugging Face model folder; None = the built-in default (built on first use)
    data: str | None = None  # .txt/.jsonl/.json file; None with the default model = the shipped sample corpus
    val_data: str | None = None  # separate validation file; None = split `val_fraction` off the training data
    mode: str = "base"  # "base": continued pre-training on raw text; "sft": instruction fine-tuning
    method: str = "lora"  # "lora", "qlora" (4-bit NF4 base + LoRA), "dora", "qdora" (DoRA on a 4-bit base) or "full"
    demo: str | None = None  # "smollm2-sft" / "smollm2-base": a demonstration on SmolLM2-135M (default/smollm2.py)
    # --- LoRA (Hu et al. 2021, section 4.1: the update is scaled by alpha / r) ------------------------------
    r: int = 8  # rank of the update A·B (also --lora-r: torchrun's own parser refuses --r, see build_parser)
    alpha: float = 16.0  # scaling numerator: the update is multiplied by alpha / r
    dropout: float = 0.05  # dropout on the LoRA branch's input
    targets: str = "all-linear"  # comma-separated module-name suffixes (q_proj,v_proj) or "all-linear"
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)
    quant_backend: str = "auto"  # QLoRA matmul: "triton" (GPU kernel), "torch" (reference) or "auto"
    # --- data -------------------------------------------------------------------------------------------------
    text_field: str = "text"  # base mode: the JSON field holding each document's text
    block_size: int = 256  # base mode: tokens per training block; sft: the longest sample kept
    val_fraction: float = 0.1  # share of samples held out for validation (seeded)
    train_on_prompt: bool = False  # sft: also train on the prompt tokens (default: response-only loss)
    packing: bool = False  # sft: pack several samples per row (no attention across samples)
    overlong: str = "truncate"  # sft: "truncate" or "drop" samples longer than block_size
    on_error: str = "stop"  # sft: a malformed record stops the run ("stop") or is skipped ("skip")
    # --- optimisation -----------------------------------------------------------------------------------------
    batch_size: int = 8  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step (loss normalised by all counted tokens)
    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay (never on norms and biases)
    warmup_steps: int = 10  # linear warm-up from 0 to `lr`
    schedule: str = "cosine"  # after warm-up: "cosine" decay to 10% of lr, or "constant"
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    epochs: float = 1.0  # passes over the training data (ignored when max_steps is set)
    max_steps: int | None = None  # optimiser steps; overrides epochs
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    # --- evaluation, checkpoints, output --------------------------------------------------------------------
    eval_every: int = 50  # steps between validation runs (0 = only at the end)
    eval_batches: int = 0  # cap on validation batches per evaluation (0 = the whole validation set)
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    output: str = "runs/latest"  # run folder: metrics.jsonl, loss.svg, checkpoints/, adapter/ or model/
    resume: str | None = None  # checkpoint folder to continue from, or "latest" (in `output`)
    seed: int = 0  # seeds data order, LoRA init and dropout: same seed, same run
    dtype: str = "float32"  # "float32" or "bfloat16" (autocast for compute; LoRA weights stay float32)
    device: str = "auto"  # "cpu", "cuda" or "auto"
    fsdp: bool = False  # under torchrun: shard parameters with FSDP2 (per block) instead of DDP (distributed.py)
    threads: int | None = None  # torch CPU threads (torch.set_num_threads); unset: torch's default / OMP_NUM_THREADS
    log_every: int = 1  # steps between progress lines / metrics records
    sample_prompts: str = ""  # prompts (separated by "|") generated before and after training
    sample_tokens: int = 40  # tokens generated per sample prompt

    def __post_init__(self):
        choices = {
            "mode": ("base", "sft"), "method": ("lora", "qlora", "dora", "qdora", "full"), "schedule": ("cosine", "constant"),
            "dtype": SUPPORTED_DTYPES, "device": ("auto", "cpu", "cuda"),
            "overlong": ("truncate", "drop"), "on_error": ("stop", "skip"),
            "quant_backend": ("auto", "triton", "torch"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MiniloraError(f"--{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("r", "block_size", "batch_size", "grad_accum", "sample_tokens", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise MiniloraError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise MiniloraError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise MiniloraError(f"--lr must be positive, got {self.lr}")
        if self.threads is not None and self.threads < 1:
            raise MiniloraError(f"--threads must be at least 1, got {self.threads}")
        if self.max_steps is not None and self.max_steps < 1:
            raise MiniloraError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise MiniloraError(f"--epochs must be positive, got {self.epochs}")
        if not 0 <= self.dropout < 1:
            raise MiniloraError(f"--dropout must be in [0, 1), got {self.dropout}")

    @property
    def target_list(self) -> str | tuple[str, ...]:
        """`targets` as apply_lora wants it: the string "all-linear" or a tuple of name suffixes."""
        if self.targets.strip() == "all-linear":
            return "all-linear"
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def to_toml(self) -> str:
        """The resolved configuration as TOML (None values are left out: TOML has no null)."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                lines.append(f"{f.name} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{f.name} = {value!r}")
            else:
                escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{f.name} = "{escaped}"')
        return "\n".join(lines) + "\n"


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _arg_type(kind) -> type:
    """The argparse type for a field's annotation (`int | None` parses as int)."""
    if kind in (int, int | None):
        return int
    return float if kind is float else str


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field, plus --config for a TOML file."""
    parser = argparse.ArgumentParser(
        prog="python -m minilora.train",
        description="Fine-tune a causal language model with LoRA, QLoRA or full fine-tuning. "
        "With no arguments: a built-in demonstration (tiny model, sample corpus, no download).",
    )
    parser.add_argument("--config", help="TOML file with any of the options below (flags override it)")
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind = hints[f.name]
        flag = f"--{_flag(f.name)}"
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=None, metavar="BOOL")
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, metavar="CHECKPOINT")
        elif f.name == "r":
            # torchrun parses every argument, also those after the module name, and stops at "--r" as an
            # ambiguous prefix of its --rdzv-* / --role / --run-path options; --lora-r passes through it.
            parser.add_argument(flag, "--lora-r", dest="r", type=int, default=None,
                                help="LoRA rank (under torchrun, write --lora-r)")
        else:
            parser.add_argument(flag, type=_arg_type(kind), default=None)
    return parser


def load_toml(path: str) -> dict:
    """Read a TOML config; unknown keys are an error naming them (a typo should not be silently ignored)."""
    p = Path(path)
    if not p.is_file():
        raise MiniloraError(f"config file {path} not found")
    try:
        values = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise MiniloraError(f"config file {path} is not valid TOML: {e}") from None
    known = {f.name for f in fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MiniloraError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return values


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < TOML file < command-line flags → a checked TrainConfig."""
    args = vars(build_parser().parse_args(argv))
    values = load_toml(args.pop("config")) if args.get("config") else {}
    values.update({k: v for k, v in args.items() if v is not None and k != "config"})
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise MiniloraError(f"bad configuration: {e}") from None


def replace(cfg: TrainConfig, **changes) -> TrainConfig:
    """A copy of `cfg` with some fields changed (re-checked)."""
    return dataclasses.replace(cfg, **changes)
