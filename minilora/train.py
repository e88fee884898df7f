"""`python -m minilora.train`: the command. Flags and TOML become a TrainConfig; with no --model and no --data it
runs the built-in demonstration (default/demos.py); the loop itself is trainer.py.

    python -m minilora.train                                   # the built-in LoRA demonstration
    python -m minilora.train --demo smollm2-sft                # the demonstration on a real model (SmolLM2)
    python -m minilora.train --model DIR --data corpus.txt     # your own run: see --help
"""

import sys

from .errors import run_cli
from .train_config import TrainConfig, parse_args
from . import trainer


def resolve_default(cfg: TrainConfig) -> TrainConfig:
    """No --model and no --data: the built-in demonstration (a tiny model built here, the shipped corpus)."""
    if cfg.model is not None or cfg.data is not None:
        return cfg
    from .default.demos import default_run_config

    return default_run_config(cfg)


def train(cfg: TrainConfig) -> dict:
    """What the command runs: the demonstration's settings when no model or data is given, then the loop."""
    if cfg.demo is not None:  # measured before and after on held-out questions (default/smollm2.py)
        from .default.smollm2 import run_demo

        return run_demo(cfg)
    return trainer.train(resolve_default(cfg))


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


def cli() -> None:
    """Console-script entry point: user mistakes print one line and exit 1 (no traceback)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
