"""Model files on disk: reading a model into minilora's Transformer and writing it back.

    safetensors_folder.py  Hugging Face folders: config.json + model.safetensors (single or sharded), also 4-bit

One module per format; `load_model` / `save_model` are the entry points the rest of minilora uses.
"""

from .safetensors_folder import load_model, quantize_model, save_model

__all__ = ["load_model", "quantize_model", "save_model"]
