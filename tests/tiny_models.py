"""Tiny random-weight Hugging Face checkpoints for tests, written by transformers itself (the oracle).

    from tiny_models import make_tiny_checkpoint, load_hf_model
    path = make_tiny_checkpoint("gemma2", tmp_path)  # config.json, model.safetensors, generation_config.json
    path = make_tiny_checkpoint("llama", tmp_path, tokenizer="llama3")  # + tokenizer files
    path = make_tiny_checkpoint("qwen3", tmp_path, tie_word_embeddings=False, num_hidden_layers=3)  # config overrides
    hf = load_hf_model(path)  # transformers' model: float32, eager attention, eval mode

FAMILIES lists every supported architecture plus variants that exercise a feature ("llama3": Llama 3.1 rope
scaling, "llama_linear": linear rope scaling). Every family has hidden size 64, 4 query heads over 2 key/value
heads, vocab 256 (or the tokenizer's), 2-3 layers, and a sliding window of 8 where the family has one, so
sequences of 20+ tokens cross it. Special ids everywhere: pad 0, bos 1, eos 2 (unless a tokenizer is written).

Weights: transformers' own initialisation (normal, std 0.2), then norm weights and biases are jittered too:
transformers initialises norms to exactly 1 (or 0 for Gemma's 1 + w) and biases to 0, which would let a wrong
norm or a missing bias go unnoticed. Gemma's embeddings are divided by sqrt(C) to undo its sqrt(C) input scaling:
otherwise the residual stream is mostly the current token's own embedding and, with tied weights, greedy decoding
just repeats the last token, which would make generation tests blind. The std of 0.2 (rather than 0.02) likewise
keeps greedy continuations varied and the top-2 logit gaps (> 1e-3) far above float32 noise (~1e-6).

`make_tiny_checkpoint(..., tokenizer="llama3")` also writes one of tests/tiny_tokenizers.py's tokenizers (with its
generation_config.json eos list) and sizes the model's vocabulary and special ids to it.
"""

from pathlib import Path

import torch

PAD, BOS, EOS = 0, 1, 2
_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
    vocab_size=256, max_position_embeddings=256, initializer_range=0.2, pad_token_id=PAD, bos_token_id=BOS,
    eos_token_id=EOS,
)
# family -> (model_type, config kwargs on top of _COMMON)
FAMILIES = {
    "llama": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})),
    "llama3": ("llama", dict(rope_parameters={  # Llama 3.1 scaling; original context 16 so 20+ tokens exceed it
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_linear": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
                                   attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),  # layer 1 slides
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),  # head_dim != hidden / heads
    "gemma": ("gemma", dict(head_dim=16, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                              attn_logit_softcapping=5.0, final_logit_softcapping=2.0)),
    "gemma3_text": ("gemma3_text", dict(
        num_hidden_layers=3, head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    "phi3": ("phi3", dict(sliding_window=8, rope_parameters={
        "rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5})),
    # Phi-3-128k's layout: original context at the top level, factor = 256 / 16 = 16; 4 rotating pairs, so 4 factors
    "phi3_longrope": ("phi3", dict(original_max_position_embeddings=16, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [1.0, 4.0, 16.0, 64.0]})),
    # Qwen YaRN: 4x of a 4096-token context; with 8 pairs at theta 1e4 the ramp blends pairs 2-6 (rope.py)
    "qwen2_yarn": ("qwen2", dict(max_position_embeddings=16384, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 4096})),
}


def make_tiny_checkpoint(family: str, path, *, dtype=torch.float32, seed: int = 0, tokenizer: str | None = None,
                         **overrides) -> Path:
    """Write a random tiny `family` model with transformers' save_pretrained into `path`; return the folder.

    overrides: config kwargs (e.g. tie_word_embeddings=True, num_hidden_layers=4). dtype: the saved dtype.
    tokenizer: None, or a tests/tiny_tokenizers.py style ("llama3", "qwen2": byte-level BPE; "llama", "gemma":
    SentencePiece-style) written into the same folder; the model's vocab size and special ids then follow it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet()
    model_type, kwargs = FAMILIES[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {**_COMMON, **kwargs, **overrides}
    generation_config = None
    if tokenizer is not None:
        kwargs.update(_write_tokenizer(path, tokenizer))
        generation_config = (path / "generation_config.json").read_text()
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif name.endswith("embed_tokens.weight") and model_type.startswith("gemma"):
                p.div_(config.hidden_size**0.5)
    model.to(dtype).save_pretrained(path)
    if generation_config is not None:  # the tokenizer's eos list wins over the one save_pretrained derived
        (path / "generation_config.json").write_text(generation_config)
    return path


def make_tiny_training_inputs(root: Path, data_name: str, data_text: str) -> tuple[Path, Path]:
    """What the trainer tests train: a tiny Llama with a byte-level tokenizer in root/model, and the training
    file root/data_name holding data_text. Returns (model folder, data file)."""
    model = make_tiny_checkpoint("llama", root / "model", tokenizer="llama3")
    data = root / data_name
    data.write_text(data_text, encoding="utf-8")
    return model, data


def _write_tokenizer(path: Path, style: str) -> dict:
    """Write a tiny tokenizer folder into `path`; return the model config fields that must agree with it."""
    from tokenizers import Tokenizer
    from tiny_tokenizers import STYLES, build_byte_level_bpe, build_metaspace_bpe

    build = build_byte_level_bpe if style in ("llama3", "qwen2") else build_metaspace_bpe
    build(path, style=style)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    info = STYLES[style]
    ids = {f"{k}_id": tok.token_to_id(info[k]) if info[k] else None for k in ("bos_token", "eos_token", "pad_token")}
    return {"vocab_size": tok.get_vocab_size(), **ids}


def load_hf_model(path, dtype=torch.float32):
    """transformers' model for `path` (the oracle): eager attention (the reference math), eval mode."""
    from transformers import AutoModelForCausalLM

    _quiet()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def _quiet():
    """No progress bars or advisory warnings from transformers in test output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
