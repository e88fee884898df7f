"""Model files on disk: reading a model into minilora's Transformer and writing it back.

    safetensors_folder.py  Hugging Face folders: config.json + model.safetensors (single or sharded), also 4-bit
    gguf_read.py           llama.cpp GGUF files: config from the metadata, tensors dequantized (optional `gguf`)
    gguf_tokenizer.py      the tokenizer a GGUF file describes (tokenizer.ggml.*), as a minilora Tokenizer
    gguf_write.py          a model and its tokenizer as one GGUF file (f16, bf16, q8_0), for llama.cpp and Ollama

One module per format; `load_model` / `save_model` are the entry points the rest of minilora uses (load_model
hands a .gguf file, or a folder holding one, to gguf_read.load_gguf_model), and `save_companion_files` completes
saved weights into a model folder.
"""

from pathlib import Path

from ..files import copy_companion_files
from .gguf_read import find_gguf, read_gguf
from .gguf_write import save_gguf
from .safetensors_folder import load_model, quantize_model, save_model

__all__ = ["find_gguf", "load_model", "quantize_model", "read_gguf", "save_companion_files", "save_gguf",
           "save_model"]


def save_companion_files(model_path, out_dir) -> list[str]:
    """Put the tokenizer (and generation config) of the model at `model_path` beside weights saved in `out_dir`:
    a Hugging Face folder's files are copied; a GGUF file has none, so its tokenizer is written out as
    tokenizer.json + tokenizer_config.json + generation_config.json. Returns the names written."""
    if find_gguf(model_path) is None:
        return copy_companion_files(model_path, out_dir)
    from ..tokenizer import load_tokenizer
    from .gguf_tokenizer import write_tokenizer_files

    return write_tokenizer_files(load_tokenizer(model_path), Path(out_dir))
