"""Write a model and its tokenizer as one llama.cpp GGUF file (what llama.cpp, Ollama and LM Studio run).

A GGUF file is a header, key/value metadata and the tensors. This module writes, with ggml-org's own `gguf`
package (gguf.GGUFWriter, gguf.quants.quantize):

- **architecture metadata** under llama.cpp's keys (`llama.block_count`, `llama.attention.head_count_kv`, ...);
- **tensors** under llama.cpp's names (`blk.3.attn_q.weight` for `model.layers.3.self_attn.q_proj.weight`), in
  the requested type: every matrix as F16, BF16 or Q8_0, every 1-D tensor (norms, biases) as F32, as llama.cpp's
  converter does (1-D tensors are tiny and Q8_0 blocks run along rows);
- **the tokenizer** as `tokenizer.ggml.*`: the kind (`gpt2` = byte-level BPE, `llama` = SentencePiece-style BPE
  with byte fallback), its pre-tokenizer name, every token with its type (normal, control, user-defined, byte,
  unused), the merges, scores, the special ids and the add-BOS/EOS flags, and `tokenizer.chat_template`.

The one trap: for the `llama` architecture llama.cpp computes RoPE on interleaved pairs (dims 2i, 2i+1), while
Hugging Face checkpoints rotate half against half (dims i, i + D/2). llama.cpp's converter therefore permutes the
rows of q_proj and k_proj, head by head, and a reader undoes it; `permute_qk` does the same here. qwen2 and qwen3
use llama.cpp's half-against-half ("NEOX") RoPE and are written unpermuted.

Error of each type (what a loader sees, against the float32 weights w):
    f32   exact                     f16   |w' - w| <= 2^-11 |w|  (round to nearest, 11 significant bits;
                                          below 2^-14 the fixed subnormal step 2^-24 rules: <= 2^-25)
    bf16  |w' - w| <= 2^-8 |w|      q8_0  per block of 32: d = amax / 127, w' = round(w / d) * fp16(d),
                                          so |w' - w| <= d / 2 + 127 * |fp16(d) - d| <= (1/2 + 127 * 2^-11) d

The file is written beside the target, fsynced and renamed into place: a reader never sees half a file.

Written: the architectures llama (Llama and Mistral-style models without a sliding window), qwen2, qwen3.
Not handled (a MiniloraError says so): other families, sliding-window layers and RoPE scaling (llama.cpp keeps
them under keys the transformers loader does not read, so nothing could check them here), 4-bit (NF4) models
(merge into a full-precision base), Unigram/WordPiece tokenizers, and the K-quants (gguf.quants cannot make them).
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import MiniloraError
from ..files import atomic_path
from .gguf_read import INSTALL_HINT

GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")  # what save_gguf writes; the first is the default
# minilora model_type -> llama.cpp architecture name
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_ARCHITECTURES = ("llama",)  # the ones whose q/k rows llama.cpp permutes to interleaved RoPE

# minilora (Hugging Face) name inside a block -> llama.cpp name
BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# Pre-tokenizer regexes of tokenizer.json files, and the name llama.cpp (and transformers' GGUF loader) gives them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZER_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def require_gguf():
    """The `gguf` package, or a MiniloraError naming the install command."""
    try:
        import gguf
    except ImportError:
        raise MiniloraError(f"writing GGUF needs the `gguf` package: {INSTALL_HINT}") from None
    return gguf


# ----------------------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------------------
def save_gguf(model, tokenizer, path, gguf_type: str = "f16", name: str | None = None, source=None) -> Path:
    """Write `model` (a minilora Transformer without LoRA layers) and `tokenizer` to the GGUF file `path`.

    gguf_type: "f16", "bf16", "q8_0" (matrices; 1-D tensors stay F32) or "f32". source: the GGUF file the model
    was read from, if any: its `tokenizer.ggml.pre` is kept (llama.cpp picks its split rules by that name).
    Returns the path.
    """
    gguf = require_gguf()
    path = Path(path)
    if source is not None:
        from .gguf_read import GGUFFile

        tokenizer.gguf_pre = GGUFFile(source).metadata.get("tokenizer.ggml.pre")
    if gguf_type not in GGUF_TYPES:
        raise MiniloraError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    config = model.config
    arch = check_architecture(model)
    Q = gguf.GGMLQuantizationType
    matrix_type = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "f32": Q.F32}[gguf_type]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f32": gguf.LlamaFileType.ALL_F32}[gguf_type]

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or path.stem)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_architecture(writer, config)
        add_tokenizer(writer, tokenizer, config.vocab_size, gguf)
        for gguf_name, array in gguf_tensors(model, arch):  # array: float32, torch's (out, in) order
            qtype = matrix_type if array.ndim == 2 else Q.F32
            if qtype == Q.Q8_0 and array.shape[-1] % 32:
                qtype = Q.F16  # Q8_0 blocks are 32 weights along a row; llama.cpp falls back the same way
            data = gguf.quants.quantize(array, qtype)  # uint8 blocks (bf16, q8_0) or float16/float32
            writer.add_tensor(gguf_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:  # on disk before the rename, so a crash cannot leave a torn file in place
            os.fsync(f.fileno())
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_architecture(model) -> str:
    """The llama.cpp architecture for this model, or a MiniloraError saying what cannot be written."""
    config = model.config
    where = f"cannot write {config.model_type} as GGUF"
    if config.model_type not in ARCHITECTURES:
        raise MiniloraError(f"{where}: supported families are {', '.join(ARCHITECTURES)}")
    if any(name.endswith(".weight.absmax") for name in model.state_dict()) or any(
            type(m).__name__ == "NF4Linear" for m in model.modules()):
        raise MiniloraError(f"{where} from a 4-bit model: merge into a full-precision base "
                            "(load it without quantize) and export that")
    if any("lora_" in name for name in model.state_dict()):
        raise MiniloraError(f"{where}: the model still has LoRA layers; merge them first (minilora.lora.merge_lora)")
    if "sliding_attention" in config.layer_types:
        raise MiniloraError(f"{where}: sliding-window attention layers are not written (use_sliding_window / "
                            "sliding_window in config.json)")
    rope = config.rope["full_attention"]
    if rope.rope_type != "default" or rope.partial_rotary_factor != 1.0:
        raise MiniloraError(f"{where}: only plain RoPE is written, this model uses {rope.rope_type!r}")
    return ARCHITECTURES[config.model_type]


def add_architecture(writer, config) -> None:
    """The hyper-parameters under llama.cpp's `{arch}.*` keys."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope["full_attention"].theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


# ----------------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------------
def gguf_tensors(model, arch: str):
    """(llama.cpp name, float32 numpy array) for every weight, q/k rows permuted for the llama architecture."""
    config = model.config
    for hf_name, t in model.state_dict().items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp reuses token_embd, as the model does
        module, _, kind = hf_name.rpartition(".")  # kind: "weight" or "bias"
        if module.startswith("model.layers."):
            layer, _, inner = module.removeprefix("model.layers.").partition(".")
            gguf_module = f"blk.{layer}.{BLOCK_NAMES[inner]}"
        else:
            gguf_module = TOP_NAMES[module]
        array = t.detach().to("cpu", torch.float32).numpy()
        if arch in PERMUTED_ARCHITECTURES and module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            array = permute_qk(array, heads)
        yield f"{gguf_module}.{kind}", np.ascontiguousarray(array)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face's half-against-half RoPE rows -> llama.cpp's interleaved pairs, head by head.

    In each head the rows (0 .. D/2-1) and (D/2 .. D-1) rotate together in Hugging Face; llama.cpp wants the
    partners side by side: rows (0, D/2, 1, D/2+1, ...). w: (n_heads * D, C) or a bias (n_heads * D,).
    """
    D = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, D // 2, *w.shape[1:])  # (H, half, D/2, C): which half, position in it
            .swapaxes(1, 2)  # (H, D/2, 2, C): the pair (i, i + D/2) next to each other
            .reshape(w.shape))


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------
def add_tokenizer(writer, tokenizer, vocab_size: int, gguf) -> None:
    """`tokenizer.ggml.*` and `tokenizer.chat_template` from a minilora Tokenizer (its tokenizers pipeline)."""
    pipeline = json.loads(tokenizer.backend.to_str())
    bpe = pipeline.get("model") or {}
    if bpe.get("type") != "BPE":
        raise MiniloraError(f"tokenizer {tokenizer.name_or_path}: only BPE tokenizers are written to GGUF, "
                            f"this one is {bpe.get('type')!r}")
    n_tokens = tokenizer.vocab_size
    if n_tokens > vocab_size:
        raise MiniloraError(f"tokenizer {tokenizer.name_or_path} has {n_tokens} tokens but the model's embedding "
                            f"has {vocab_size} rows: they must agree")
    byte_level = _has_type(pipeline.get("pre_tokenizer"), "ByteLevel") or _has_type(pipeline.get("decoder"), "ByteLevel")
    if not byte_level and not bpe.get("byte_fallback"):
        raise MiniloraError(f"tokenizer {tokenizer.name_or_path}: a BPE tokenizer that is neither byte-level nor "
                            "SentencePiece-style (byte fallback) cannot be written to GGUF")
    T = gguf.TokenType
    added = {i: t for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i) if i < n_tokens else None
        if token is None:  # embedding rows past the tokenizer (padded vocabularies): llama.cpp's placeholder
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        elif token == tokenizer.unk_token:
            tokens.append(token)
            types.append(T.UNKNOWN)
        elif not byte_level and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)
            types.append(T.BYTE)
        else:
            tokens.append(token)
            types.append(T.NORMAL)
        # SentencePiece BPE merges the best-scoring pair first; vocabularies are in merge order, so -id ranks them.
        scores.append(-float(i) if types[-1] == T.NORMAL else 0.0)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges") or []]

    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, pipeline) if byte_level else "default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if not byte_level:
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_adds_space_prefix(pipeline))
    if merges:
        writer.add_token_merges(merges)
    for token, add in ((tokenizer.bos_token, writer.add_bos_token_id), (tokenizer.eos_token, writer.add_eos_token_id),
                       (tokenizer.unk_token, writer.add_unk_token_id), (tokenizer.pad_token, writer.add_pad_token_id)):
        if tokenizer.token_to_id(token) is not None:
            add(tokenizer.token_to_id(token))
    writer.add_add_bos_token(bool(tokenizer.add_bos_token))
    writer.add_add_eos_token(bool(tokenizer.add_eos_token))
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(tokenizer, pipeline: dict) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text before BPE (`tokenizer.ggml.pre`).

    A tokenizer read from a GGUF keeps the file's own name (attribute `gguf_pre`); otherwise the split regex of
    tokenizer.json is recognised (Llama 3, Qwen 2), a Digits + ByteLevel pipeline is SmolLM's, a bare ByteLevel
    split GPT-2's, and anything else "default"."""
    known = getattr(tokenizer, "gguf_pre", None)
    if known:
        return known
    pre = pipeline.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            pattern = step.get("pattern") or {}
            regex = pattern.get("Regex") if isinstance(pattern, dict) else None
            if regex in PRE_TOKENIZER_NAMES:
                return PRE_TOKENIZER_NAMES[regex]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt2"
    return "default"


def _has_type(node, kind: str) -> bool:
    """Whether a tokenizer.json pipeline step (or a Sequence of them) contains a step of type `kind`."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    return any(_has_type(child, kind) for key in ("pretokenizers", "decoders", "normalizers", "processors")
               for child in node.get(key) or [])


def _adds_space_prefix(pipeline: dict) -> bool:
    """SentencePiece-style: is "▁" put before the text (Metaspace prepend, or a Prepend normaliser)?"""
    def walk(node):
        if not isinstance(node, dict):
            return False
        if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") in ("first", "always"):
            return True
        if node.get("type") == "Prepend":
            return True
        return any(walk(child) for key in ("pretokenizers", "normalizers") for child in node.get(key) or [])
    return walk(pipeline.get("pre_tokenizer")) or walk(pipeline.get("normalizer"))
