"""minilora: a from-scratch, educational LoRA / QLoRA fine-tuning engine.

    import minilora
    model = minilora.load_model("path/to/hf-model", dtype="bfloat16")      # or quantize="nf4" (QLoRA)
    tokenizer = minilora.load_tokenizer("path/to/hf-model")
    minilora.apply_lora(model, r=16, alpha=32, targets="all-linear")
    logits = model(input_ids)                                              # (B, T, vocab)
    minilora.save_adapter(model, "adapter/")                               # PEFT format

Where each piece lives (one concept per file): model.py (the transformer), formats/ (model files in and out),
tokenizer.py, chat_template/ (the template engine), lora.py, adapter.py, loss.py, data.py, sft.py, quant/ (NF4,
NF4Linear, 4-bit checkpoints), trainer.py (the loop) and train.py (its command).
The names below are imported lazily so `import minilora` stays fast and never imports triton unless needed.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # models and checkpoints
    "load_model": "formats", "save_model": "formats",
    "Transformer": "model", "KVCache": "model", "ModelConfig": "config", "load_config": "config",
    "generate": "generation",
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
    "quantize_nf4": "quant", "dequantize_nf4": "quant", "NF4Weight": "quant", "NF4Linear": "quant",
    "quantize_model": "formats", "dequantize_model": "quant", "model_memory": "quant",
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
