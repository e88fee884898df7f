"""The training run's configuration: one dataclass, its command-line flags, and optional TOML files.

Why one flat dataclass: every knob of a run is in one place with a comment, the CLI maps one-to-one onto its
fields (`--block-size` ↔ `block_size`), a TOML file may set any of them, and the resolved values are saved in
the run folder (`config.toml`) so a run can be reproduced. Precedence: defaults < TOML file < flags.

Checks live in `__post_init__` so a mistake (batch size 0, unknown method) is one clear line before anything
is loaded.

One source of documentation: the comment after each field below *is* its `--help` line. `field_help()` reads
them once from this file (a field's comment, its default and its choices become one help line; the `# --- ... ---`
rules become the help's sections), so the code and the help cannot drift apart.

Resuming (`--output RUN --resume`) starts from RUN/config.toml, the saved configuration, and only the flags in
`SAFE_ON_RESUME` may change it: a different `--lr` or `--r` would silently make a different run.
"""

import argparse
import dataclasses
import difflib
import re
import textwrap
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import get_args, get_type_hints

from .config import SUPPORTED_DTYPES
from .errors import MiniloraError


@dataclass
class TrainConfig:
    # --- what to train ---------------------------------------------------------------------------------------
    model: str | None = None  # Hugging Face model folder, or "default" (the shipped tiny model); None = the demo
    data: str | None = None  # .txt .jsonl .json .csv .tsv .parquet .arrow file or save_to_disk folder; None = demo data
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
    text_field: str = "text"  # base mode: the field / column holding each document's text
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
    resume: str | None = None  # continue `output` from its saved config.toml and latest checkpoint (or this one)
    overwrite: bool = False  # start afresh in an `output` that holds a run (its results are deleted)
    keep_checkpoints: int = 3  # keep the newest N checkpoints (0 = all); never deletes `latest` or the best
    save_best: bool = False  # checkpoint each new best validation loss and export the adapter from the best one
    patience: int = 0  # early stopping: stop after N evaluations without a better validation loss (0 = off)
    log: str = "jsonl"  # "jsonl" or "tensorboard" (also events in output/tensorboard); --log-to under torchrun
    seed: int = 0  # seeds data order, LoRA init and dropout: same seed, same run
    dtype: str = "float32"  # "float32" or "bfloat16" (autocast for compute; LoRA weights stay float32)
    device: str = "auto"  # "cpu", "cuda" or "auto"
    fsdp: bool = False  # under torchrun: shard parameters with FSDP2 (per block) instead of DDP (distributed.py)
    threads: int | None = None  # torch CPU threads (torch.set_num_threads); unset: torch's default / OMP_NUM_THREADS
    log_every: int = 1  # steps between progress lines / metrics records
    sample_prompts: str = ""  # prompts (separated by "|") generated before and after training
    sample_tokens: int = 40  # tokens generated per sample prompt

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise MiniloraError(f"--{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("r", "block_size", "batch_size", "grad_accum", "sample_tokens", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise MiniloraError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("keep_checkpoints", "patience"):
            if getattr(self, name) < 0:
                raise MiniloraError(f"--{_flag(name)} must be 0 or more, got {getattr(self, name)}")
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
        """The resolved configuration as TOML, with absolute paths so it works from any folder (None values are
        left out: TOML has no null; `resume` and `overwrite` are left out: they say how this command started the
        run, not what the run is)."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("resume", "overwrite"):
                continue
            if f.name in PATH_FIELDS:
                value = str(Path(value).resolve())
            if isinstance(value, bool):
                lines.append(f"{f.name} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{f.name} = {value!r}")
            else:
                escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{f.name} = "{escaped}"')
        return "\n".join(lines) + "\n"


CHOICES = {  # the allowed values of the string fields that have a fixed set (checked, and listed in --help)
    "mode": ("base", "sft"), "method": ("lora", "qlora", "dora", "qdora", "full"),
    "schedule": ("cosine", "constant"),
    "dtype": SUPPORTED_DTYPES, "device": ("auto", "cpu", "cuda"),
    "overlong": ("truncate", "drop"), "on_error": ("stop", "skip"),
    "quant_backend": ("auto", "triton", "torch"), "log": ("jsonl", "tensorboard"),
}
PATH_FIELDS = ("model", "data", "val_data")  # saved as absolute paths in config.toml
# What `--resume` lets a flag change: how long to run, how often to evaluate, save and log, and what to print.
# Everything else (lr, r, data, targets...) defines the run; changing it means starting a new one.
SAFE_ON_RESUME = ("max_steps", "eval_every", "eval_batches", "save_every", "log_every", "sample_prompts",
                  "sample_tokens", "keep_checkpoints", "patience", "log", "output", "resume")
# The Hugging Face Trainer's spellings of the same options, accepted as aliases.
HF_ALIASES = {"lr": "--learning_rate", "epochs": "--num_train_epochs", "batch_size": "--per_device_train_batch_size",
              "grad_accum": "--gradient_accumulation_steps", "output": "--output_dir"}
# torchrun parses every argument, also those after the module name, and stops at a flag that is an ambiguous prefix
# of its own: --r (--rdzv-*, --role, --run-path) and --log (--log-dir, --logs-specs, ...). These spellings pass.
TORCHRUN_ALIASES = {"r": "--lora-r", "log": "--log-to"}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def field_help() -> tuple[dict[str, str], dict[str, str]]:
    """({field: its comment}, {field: the section it opens}) read from TrainConfig's source in this file.

    A comment line right under a field continues that field's comment; `# --- name ---` starts a section."""
    lines = Path(__file__).read_text(encoding="utf-8").split("class TrainConfig:", 1)[1].splitlines()[1:]
    helps, sections, section, last = {}, {}, None, None
    for line in lines:
        if line.strip() and not line.startswith(" "):
            break  # the end of the class
        if m := re.match(r"    # --- (.+?) -*$", line):
            section, last = m[1], None
        elif m := re.match(r"    (\w+): [^#]+?  # (.+)$", line):
            last, helps[m[1]] = m[1], m[2]
            if section:
                sections[m[1]], section = section, None
        elif (m := re.match(r"    \s*# (.+)$", line)) and last:
            helps[last] += " " + m[1]
        elif not line.strip() or line.strip().startswith("def "):
            last = None
    return helps, sections


def nearest_flag(flag: str, parser: argparse.ArgumentParser) -> str | None:
    """The parser's option nearest to a mistyped one (an alias counts as its main spelling)."""
    spellings = {}
    for action in parser._actions:
        for option in action.option_strings:
            spellings[option.lstrip("-").replace("_", "-")] = action.option_strings[0]
    match = difflib.get_close_matches(flag.lstrip("-").replace("_", "-"), list(spellings), n=1, cutoff=0.6)
    return spellings[match[0]] if match else None


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


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's layout, but a wrapped help line never breaks inside 'all-linear' or 'module-name'."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (help = the field's comment, default and choices), plus --config."""
    parser = argparse.ArgumentParser(
        prog="python -m minilora.train", allow_abbrev=False,  # no prefixes: --lr never silently means --lr-x
        formatter_class=lambda prog: _HelpFormatter(prog, max_help_position=36, width=120),
        description="Fine-tune a causal language model with LoRA, QLoRA or full fine-tuning. "
        "With no arguments: a built-in demonstration (tiny model, sample corpus, no download).",
    )
    parser.add_argument("--config", metavar="TOML", help="TOML file with any of the options below (flags override "
                        "it); keys are the option names, e.g. lr = 1e-4")
    hints = get_type_hints(TrainConfig)
    helps, sections = field_help()
    group = parser
    for f in fields(TrainConfig):
        if f.name in sections:
            group = parser.add_argument_group(sections[f.name])
        kind, default = hints[f.name], f.default
        text = helps.get(f.name, "").replace("%", "%%")  # argparse %-formats help strings
        shown = "none" if default is None else str(default).lower() if kind is bool else repr(default)
        text += f" (default: {shown})"
        flags = [f"--{_flag(f.name)}"] + [a for a in (HF_ALIASES.get(f.name), TORCHRUN_ALIASES.get(f.name)) if a]
        if kind is bool:
            group.add_argument(*flags, type=_parse_bool, nargs="?", const=True, default=None, metavar="BOOL",
                               help=text)
        elif f.name == "resume":
            group.add_argument(*flags, nargs="?", const="latest", default=None, metavar="CHECKPOINT", help=text)
        else:
            metavar = "{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES else None
            group.add_argument(*flags, type=_arg_type(kind), default=None, metavar=metavar, help=text, dest=f.name)
    return parser


def _expected_type(kind) -> tuple[tuple[type, ...], str]:
    """The Python types a TOML value may have for a field of type `kind`, and how to say it."""
    kind = next((k for k in get_args(kind) if k is not type(None)), kind)  # int | None -> int
    return {bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
            str: ((str,), "a string")}[kind]


def _check_toml_types(path, values: dict) -> None:
    """A TOML value of the wrong type is an error naming the key and the type it needs."""
    hints = get_type_hints(TrainConfig)
    for key, value in values.items():
        allowed, expected = _expected_type(hints[key])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise MiniloraError(f"config file {path}: {key} should be {expected}, got {value!r} "
                                f"({type(value).__name__})")


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
        near = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.6)
        raise MiniloraError(f"config file {path}: unknown option(s) {', '.join(unknown)}"
                            + (f"; did you mean {near[0]}?" if near else ""))
    _check_toml_types(path, values)
    return values


def parse_flags(argv: list[str] | None = None) -> dict:
    """The flags given on the command line, {field: value}; an unknown flag is an error naming the nearest one."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u.split("=", 1)[0] for u in unknown if u.startswith("-")), None)
        if flag is None:
            raise MiniloraError(f"unexpected argument {unknown[0]!r}: every option is a --flag (see --help)")
        near = nearest_flag(flag, parser)
        raise MiniloraError(f"unknown option {flag}" + (f"; did you mean {near}?" if near else "; see --help"))
    return {k: v for k, v in vars(args).items() if v is not None}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < TOML file < command-line flags → a checked TrainConfig.

    `--output RUN --resume` (no --config) starts instead from RUN/config.toml, the saved run (resume_values)."""
    given = parse_flags(argv)
    config = given.pop("config", None)
    saved = Path(given.get("output", TrainConfig.output)) / "config.toml"
    if given.get("resume") and config is None and saved.is_file():
        values = resume_values(saved, given)
    else:
        values = {**(load_toml(config) if config else {}), **given}
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise MiniloraError(f"bad configuration: {e}") from None


def resume_values(saved: Path, given: dict) -> dict:
    """The saved configuration with the given flags on top; a flag that would change the run itself is refused."""
    values = load_toml(saved)

    def same(name, a, b):
        if name in PATH_FIELDS and a is not None and b is not None:
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    changed = [f"--{_flag(k)} (saved {values.get(k)!r}, given {v!r})" for k, v in given.items()
               if k not in SAFE_ON_RESUME and not same(k, values.get(k, getattr(TrainConfig, k)), v)]
    if changed:
        safe = ", ".join(f"--{_flag(k)}" for k in SAFE_ON_RESUME if k not in ("output", "resume"))
        raise MiniloraError(f"--resume continues the run saved in {saved}; it cannot change {'; '.join(changed)}. "
                            f"Only {safe} may change on resume; for other settings start a new --output")
    return {**values, **given}


def replace(cfg: TrainConfig, **changes) -> TrainConfig:
    """A copy of `cfg` with some fields changed (re-checked)."""
    return dataclasses.replace(cfg, **changes)
