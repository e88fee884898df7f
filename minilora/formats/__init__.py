"""Model files on disk: reading a model into minilora's Transformer and writing it back.

    safetensors_folder.py  Hugging Face folders: config.json + model.safetensors (single or sharded), also 4-bit
    gguf_read.py           llama.cpp GGUF files: config from the metadata, tensors dequantized (optional `gguf`)
    gguf_tokenizer.py      the tokenizer a GGUF file describes (tokenizer.ggml.*), as a minilora Tokenizer
    gguf_write.py          a model and its tokenizer as one GGUF file (f16, bf16, q8_0), for llama.cpp and Ollama

One module per format; `load_model` / `save_model` are the entry points the rest of minilora uses (load_model
hands a .gguf file, or a folder holding one, to gguf_read.load_gguf_model).
"""

from .gguf_read import find_gguf, read_gguf
from .gguf_write import save_gguf
from .safetensors_folder import load_model, quantize_model, save_model

__all__ = ["find_gguf", "load_model", "quantize_model", "read_gguf", "save_gguf", "save_model"]
