"""Tiny GGUF files for tests, written with gguf.GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes them.

    from gguf_models import hf_to_gguf, tokenizer_to_gguf
    folder = make_tiny_checkpoint("llama", tmp_path / "hf")           # transformers writes the checkpoint
    path = hf_to_gguf(folder, tmp_path / "gguf" / "model.gguf", qtype="Q8_0", tokenizer="llama3")

This module does not use minilora: it is the stand-in for llama.cpp's converter, so that minilora's reader and
transformers' GGUF loader (the oracle) both read files laid out as real ones are. What it does, as the converter
does (facts from convert_hf_to_gguf.py and gguf-py's constants):
- names from gguf-py's own TensorNameMap (`gguf.get_tensor_name_map`), not from a table of ours;
- llama architecture (Llama, Mistral): the rows of q_proj / k_proj (weights and biases) permuted to ggml's RoPE
  layout, `w.reshape(H, 2, D/2, ...).swapaxes(1, 2)`; Llama 3.1 RoPE written as a `rope_freqs` tensor;
- Gemma 1/2/3: every RMSNorm weight stored as 1 + w;
- Phi-3: fused qkv_proj and gate_up_proj stored as they are (attn_qkv, ffn_up);
- tied embeddings: no output.weight; norms and biases stay F32, 2-D weights get `qtype`.
Types gguf-py can quantize (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) are quantized from the weights; the K-quants
(which gguf-py only dequantizes) are written as random blocks with sane fp16 scales: every reader then has to
dequantize the same bytes, which is what the tests compare.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# byte offsets of the fp16 super-block scales (d, and dmin where there is one) in each K-quant block
_K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: Hugging Face's half-split RoPE rows -> ggml's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3.1 scaling: one divisor per rotating pair."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _rope_params(config: dict) -> dict:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "full_attention" in params:
        params = params["full_attention"]
    return {"rope_theta": config.get("rope_theta", 10_000.0), **params}


def _add_tensor(writer, gguf, name: str, w: np.ndarray, qtype: str, rng) -> None:
    if w.ndim == 1 or qtype == "F32":
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        return
    t = gguf.GGMLQuantizationType[qtype]
    if qtype not in QUANTIZABLE:  # K-quants and the rest: random blocks (gguf-py cannot quantize these)
        block, type_size = gguf.GGML_QUANT_SIZES[t]
        rows, cols = w.shape
        assert cols % block == 0, f"{name}: {cols} columns are not a multiple of {block}"
        raw = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
        for offset in _K_SCALE_OFFSETS.get(qtype, (0,)):  # fp16 scales in [0.001, 0.01]: finite, model-sized weights
            scale = rng.uniform(0.001, 0.01, size=(rows, cols // block)).astype(np.float16)
            raw[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
        writer.add_tensor(name, raw.reshape(rows, -1), raw_dtype=t)  # byte shape; the writer derives the rest
        return
    if qtype == "F16":
        writer.add_tensor(name, w.astype(np.float16))
        return
    data = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), t)
    writer.add_tensor(name, data, raw_dtype=t)


def hf_to_gguf(hf_dir, out_path, qtype: str = "F32", tokenizer: str | None = None, name: str = "tiny",
               chat_template: str | None = None, seed: int = 0, metadata: dict | None = None,
               tensor_types: dict | None = None) -> Path:
    """Convert a tiny Hugging Face checkpoint folder (config.json + model.safetensors) into one GGUF file.

    tokenizer: None (a 256-token dummy vocabulary matching the tiny models), or a folder written by
    tests/tiny_tokenizers.py whose tokenizer.json is stored as tokenizer.ggml.* (see add_tokenizer).
    metadata: {key: value} replacing written values (value None: drop the key), for bad-input tests.
    tensor_types: {gguf tensor name: type} overriding qtype for single tensors.
    """
    import gguf
    from safetensors.numpy import load_file

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    model_type = config["model_type"]
    arch = GGUF_ARCH[model_type]
    n_heads, n_layers = config["num_attention_heads"], config["num_hidden_layers"]
    n_kv = config.get("num_key_value_heads") or n_heads
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    rope = _rope_params(config)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(n_layers)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(rope["rope_theta"])
    if "head_dim" in config or arch in ("gemma", "gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if arch == "phi3":
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if arch in ("gemma2", "gemma3", "phi3"):
        writer.add_sliding_window(config.get("sliding_window") or 0)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_file_type(0)

    rng = np.random.default_rng(seed)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    tied = "lm_head.weight" not in state or config.get("tie_word_embeddings", False)
    for hf_name, w in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        assert gguf_name is not None, hf_name
        w = w.astype(np.float32)
        if arch == "llama" and base.endswith("q_proj"):
            w = _permute(w, n_heads)
        elif arch == "llama" and base.endswith("k_proj"):
            w = _permute(w, n_kv)
        if arch in ("gemma", "gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            w = w + 1.0
        full = f"{gguf_name}.{suffix}"
        _add_tensor(writer, gguf, full, w, (tensor_types or {}).get(full, qtype), rng)
    if arch == "llama" and rope_type == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(rope, head_dim))
    if arch == "phi3" and rope_type == "longrope":
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
        writer.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings", 4096))

    if tokenizer is None:
        _dummy_tokenizer(writer, config)
    else:
        add_tokenizer(writer, Path(tokenizer), chat_template)
    for key, value in (metadata or {}).items():
        if value is None:
            writer.kv_data[0].pop(key)
        else:
            writer.kv_data[0][key].value = value
    _write(writer)
    return out_path


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _dummy_tokenizer(writer, config: dict) -> None:
    """A byte-level vocabulary of 256 single characters (ids = the tiny models' vocab)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    letters = list(bytes_to_unicode().values())[:config["vocab_size"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(letters)
    writer.add_token_types([1] * len(letters))
    writer.add_token_merges([])
    for key in ("bos", "eos", "pad"):
        if config.get(f"{key}_token_id") is not None:
            getattr(writer, f"add_{key}_token_id")(config[f"{key}_token_id"])


def add_tokenizer(writer, folder: Path, chat_template: str | None = None, merges: bool = True,
                  pre: str | None = None) -> None:
    """Store a tokenizer folder's tokenizer.json as tokenizer.ggml.* metadata (llama.cpp's layout).

    Byte-level BPE -> model "gpt2" with merges; SentencePiece-style (Metaspace / "▁") -> model "llama" with
    scores (-rank) and, if `merges`, the merges too. Special added tokens are CONTROL (3), byte tokens <0xNN>
    BYTE (6), the rest NORMAL (1).
    """
    tj = json.loads((folder / "tokenizer.json").read_text("utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    vocab = dict(tj["model"]["vocab"])
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    special = {t["content"] for t in tj["added_tokens"] if t["special"]}
    byte_level = "ByteLevel" in json.dumps(tj["pre_tokenizer"])
    types = [3 if t in special else 6 if (t.startswith("<0x") and len(t) == 6) else 1 for t in tokens]
    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    if pre or byte_level:
        writer.add_tokenizer_pre(pre or ("llama-bpe" if "{1,3}" in json.dumps(tj["pre_tokenizer"]) else "qwen2"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merge_list = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    if byte_level or merges:
        writer.add_token_merges(merge_list)
    if not byte_level:
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
    ids = {t: i for i, t in enumerate(tokens)}
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unk"), ("pad_token", "pad")):
        value = config.get(key)
        if isinstance(value, dict):
            value = value["content"]
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(ids[value])
    if "add_bos_token" in config:
        writer.add_add_bos_token(bool(config["add_bos_token"]))
    elif byte_level:
        writer.add_add_bos_token("TemplateProcessing" in json.dumps(tj.get("post_processor")))
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def tokenizer_to_gguf(folder, out_path, arch: str = "llama", chat_template: str | None = None,
                      merges: bool = True, pre: str | None = None) -> Path:
    """A GGUF file holding only a tokenizer (metadata, no tensors), for tokenizer tests."""
    import gguf

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), arch)
    add_tokenizer(writer, Path(folder), chat_template, merges=merges, pre=pre)
    _write(writer)
    return out_path


def torch_state(path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (float32), for comparisons."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}
