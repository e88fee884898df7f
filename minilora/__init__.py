"""minilora: a from-scratch, educational LoRA / QLoRA fine-tuning engine.

    import minilora
    model = minilora.load_model("path/to/hf-model", dtype="bfloat16")      # or quantize="nf4" (QLoRA)
    tokenizer = minilora.load_tokenizer("path/to/hf-model")
    minilora.apply_lora(model, r=16, alpha=32, targets="all-linear")
    logits = model(input_ids)                                              # (B, T, vocab)
    minilora.save_adapter(model, "adapter/")                               # PEFT format

Where each piece lives (one concept per file): model.py (the transformer), checkpoint.py (safetensors in/out),
tokenizer.py, chat_template.py, lora.py, adapter.py, loss.py, data.py, sft.py, nf4.py, nf4_linear.py, train.py.
The names below are imported lazily so `import minilora` stays fast and never imports triton unless needed.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # models and checkpoints
    "load_model": "checkpoint", "save_model": "checkpoint",
    "Transformer": "model", "KVCache": "model", "ModelConfig": "config", "load_config": "config",
    "generate": "generate",
    # tokens and chat templates
    "load_tokenizer": "tokenizer", "Tokenizer": "tokenizer", "render_chat_template": "chat_template",
    "select_chat_template": "chat_template", "ChatTemplateError": "chat_template",
    # LoRA and adapters
    "LoRALinear": "lora", "apply_lora": "lora", "merge_lora": "lora", "count_parameters": "lora",
    "parameter_summary": "lora", "save_adapter": "adapter", "load_adapter": "adapter",
    # loss and data
    "next_token_loss": "loss", "chunked_next_token_loss": "loss",
    "load_texts": "data", "pack_into_blocks": "data", "pad_collate": "data",
    "load_sft_data": "sft", "tokenize_conversation": "sft", "pack_samples": "sft",
    # QLoRA
    "quantize_nf4": "nf4", "dequantize_nf4": "nf4", "NF4Weight": "nf4", "NF4Linear": "nf4_linear",
    "quantize_model": "checkpoint", "dequantize_model": "quantized_checkpoint", "model_memory": "quantized_checkpoint",
    # training
    "TrainConfig": "train_config", "train": "train",
    "MiniloraError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import `minilora.<module>` on first use of one of its public names (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minilora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
