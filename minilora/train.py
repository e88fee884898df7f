"""`python -m minilora.train`: the command. Flags and TOML become a TrainConfig; with no --model and no --data it
runs the built-in demonstration (default/demos.py); the loop itself is trainer.py.

    python -m minilora.train                                   # the built-in LoRA demonstration
    python -m minilora.train --demo smollm2-sft                # the demonstration on a real model (SmolLM2)
    python -m minilora.train --model DIR --data corpus.txt     # your own run: see --help
"""

import sys

from .distributed import stop_with_the_run
from .errors import MiniloraError, run_cli
from .model_names import DEFAULT, resolve_model
from .train_config import TrainConfig, parse_args, replace
from . import trainer


def resolve_default(cfg: TrainConfig) -> TrainConfig:
    """No --data (and no --model or --model default): the built-in demonstration (the shipped tiny model and
    corpus). `--model default` with --data trains the shipped model on that data."""
    if cfg.data is None and cfg.model in (None, DEFAULT):
        from .default.demos import default_run_config

        return default_run_config(cfg)
    if cfg.data is None:
        raise MiniloraError(f"--model {cfg.model} needs --data (a training file); with no --model and no --data "
                            "the built-in demonstration runs")
    return replace(cfg, model=resolve_model(cfg.model)) if cfg.model is not None else cfg


def train(cfg: TrainConfig) -> dict:
    """What the command runs: the demonstration's settings when no model or data is given, then the loop."""
    if cfg.demo is not None:  # measured before and after on held-out questions (default/smollm2.py)
        from .default.smollm2 import run_demo

        return run_demo(cfg)
    return trainer.train(resolve_default(cfg))


def main(argv: list[str] | None = None) -> int:
    with stop_with_the_run():  # under torchrun: a rank left behind by a dead one says so in one line
        train(parse_args(argv))
    return 0


def cli() -> None:
    """Console-script entry point: user mistakes print one line and exit 1 (no traceback)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
