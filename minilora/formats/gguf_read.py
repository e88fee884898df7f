"""Read llama.cpp's GGUF files: the config from the metadata, the weights dequantized to torch tensors.

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is one header of typed key/value
metadata — the model's hyper-parameters under `<arch>.*`, its tokenizer under `tokenizer.*` — followed by the
tensors, each stored as F32/F16/BF16 or in one of ggml's block formats (32 or 256 weights share a scale). Parsing
and dequantizing use ggml-org's own `gguf` package (`gguf.GGUFReader`, `gguf.quants.dequantize`), an optional
extra: `pip install -e ".[gguf]"`.

What this module undoes, because llama.cpp's converter (convert_hf_to_gguf.py) changed it on the way in:
- names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight` (TENSOR_NAMES below);
- llama (and Mistral, which llama.cpp writes as llama): the rows of Q and K are permuted from Hugging Face's
  "rotate halves" RoPE layout to ggml's interleaved pairs; `unpermute_qk` puts them back (weights and biases);
- Gemma 1/2/3: every RMSNorm weight is stored as 1 + w (ggml multiplies by the stored weight); we subtract the 1
  in float32 before casting;
- Phi-3: q/k/v stay fused in `attn_qkv` and gate/up in `ffn_up` (gate first), as minilora keeps them.

What llama.cpp hard-codes instead of writing it to the file, taken over here (transformers' GGUF loader, our test
oracle, takes the config class defaults instead; where those differ from llama.cpp the tests say so):
- Gemma 2/3 attention scale: 1/sqrt(head_dim), except the 27B models (46 / 62 layers): 1/sqrt(hidden / heads);
- Gemma 2 alternates sliding and global layers (even layers slide); Gemma 3 makes every 6th layer global and
  runs its local layers at RoPE base 10000; Gemma 2's soft-caps default to 50 / 30 when the file omits them;
- Mistral-style llama files get full attention in every layer (llama.cpp applies no sliding window to llama).
RoPE scaling comes from `<arch>.rope.scaling.*` (linear, yarn) or from tensors: Phi-3's `rope_factors_long/short`
(LongRoPE) and Llama 3.1's `rope_freqs` (one divisor per frequency, read as LongRoPE with equal lists).

The result is a Hugging Face-style config dict (`gguf_hf_config`), mapped onto ModelConfig by config.py as any
config.json is, so a model loaded from GGUF also saves as an ordinary safetensors folder.

Not handled (a MiniloraError names what was found): other architectures (MoE, Falcon, GPT-2...), tensor types
outside DEQUANTIZABLE (IQ*, TQ*, MXFP4...), split files (`-00001-of-00003.gguf`), vocabularies without
`tokenizer.ggml.tokens`.
"""

import re
from pathlib import Path

import numpy as np
import torch

from ..config import SUPPORTED_DTYPES, ModelConfig
from ..errors import MiniloraError

INSTALL_HINT = 'pip install -e ".[gguf]" (or: pip install gguf)'
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
DEQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# GGUF architecture -> Hugging Face model_type / class
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
               "gemma3": "gemma3_text", "phi3": "phi3"}
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
              "phi3": "Phi3ForCausalLM"}
# llama.cpp's tensor names (gguf-py's MODEL_TENSOR names) -> minilora's (= Hugging Face's)
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",  # Qwen3, Gemma 3
    "ffn_norm": "post_attention_layernorm",  # the norm before the MLP (Gemma 2/3: pre_feedforward_layernorm)
    "post_attention_norm": "post_attention_layernorm",  # Gemma 2/3 sandwich norms
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",  # Phi-3: ffn_up is the fused gate_up_proj
    "ffn_down": "mlp.down_proj",
}
# config.json field -> the GGUF key it came from (for error messages)
HF_TO_GGUF_KEYS = {"num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
                   "num_hidden_layers": "block_count", "intermediate_size": "feed_forward_length",
                   "hidden_size": "embedding_length", "head_dim": "attention.key_length",
                   "sliding_window": "attention.sliding_window", "max_position_embeddings": "context_length"}
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


# ----------------------------------------------------------------------------------------------------------
# Finding and opening the file
# ----------------------------------------------------------------------------------------------------------
def find_gguf(path) -> Path | None:
    """The GGUF file `path` means: itself if it is a .gguf file, or the one .gguf in a folder without config.json.

    None when `path` is not GGUF (a Hugging Face folder: config.json wins over a stray .gguf beside it).
    """
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise MiniloraError(f"GGUF file not found: {path}")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            names = ", ".join(p.name for p in files[:4]) + (", ..." if len(files) > 4 else "")
            raise MiniloraError(f"{path} holds {len(files)} GGUF files ({names}): pass the path of the one to load")
    return None


def import_gguf(path=None):
    """The `gguf` package, or a MiniloraError naming the install command."""
    try:
        import gguf
    except ImportError:
        where = f"{path}: " if path is not None else ""
        raise MiniloraError(f"{where}reading GGUF files needs the `gguf` package: {INSTALL_HINT}") from None
    return gguf


class GGUFFile:
    """One opened GGUF file: `metadata` (key -> Python value), `tensors` (name -> gguf ReaderTensor), `path`.

    The tensor data stays memory-mapped; nothing is dequantized until `tensor()` is asked for it.
    """

    def __init__(self, path):
        self.path = Path(path)
        gguf = import_gguf(self.path)
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise MiniloraError(f"{self.path}: not a readable GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            reader = _reader_class(gguf)(str(self.path))
        except Exception as e:  # truncated header or data, bad offsets: ValueError / IndexError / struct errors
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MiniloraError(f"{self.path}: not a readable GGUF file: truncated or corrupt ({detail}); "
                                "re-download or re-convert it") from None
        self.gguf = gguf
        self.reader = reader
        self.metadata = {name: _field_value(field) for name, field in reader.fields.items()
                         if not name.startswith("GGUF.")}
        self.tensors = {}
        for t in reader.tensors:
            self._check_size(t)
            self.tensors[t.name] = t
        self.architecture = self.get("general.architecture", str)

    def _check_size(self, t) -> None:
        """A truncated file: the reader maps fewer bytes than the tensor's shape and type need."""
        block, type_size = self.gguf.GGML_QUANT_SIZES.get(t.tensor_type, (1, 0))
        expected = int(t.n_elements) // block * type_size
        if type_size and t.data.nbytes != expected:
            raise MiniloraError(f"{self.path}: tensor {t.name!r} holds {t.data.nbytes} bytes, its shape "
                                f"{self.shape(t.name)} in {t.tensor_type.name} needs {expected}: the file is truncated")

    def get(self, key: str, kind=None, default=...):
        """metadata[key], checked to be of `kind` (int / float / str / bool / list); MiniloraError naming the key."""
        if key not in self.metadata:
            if default is ...:
                raise MiniloraError(f"{self.path}: required metadata {key!r} is missing")
            return default
        value = self.metadata[key]
        ok = kind is None or (isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool)))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise MiniloraError(f"{self.path}: metadata {key!r} should be {kind.__name__}, found {value!r}")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch-order shape (slowest dimension first; GGUF lists them fastest first)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to a float32 torch tensor (torch-order shape)."""
        t = self.tensors[name]
        qtype = t.tensor_type.name
        if qtype not in DEQUANTIZABLE:
            raise MiniloraError(f"{self.path}: tensor {name!r} is stored as {qtype}, which minilora does not "
                                f"read; supported types: {', '.join(DEQUANTIZABLE)}")
        values = self.gguf.quants.dequantize(t.data, t.tensor_type)  # float32, torch-order rows
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not values.flags.writeable:  # F32: a view of the read-only mapping; the model gets its own copy
            values = values.copy()
        return torch.from_numpy(values.reshape(self.shape(name)))


def _reader_class(gguf):
    """gguf.GGUFReader, holding the file as a plain ndarray view of its memory map instead of an np.memmap.

    The reader slices its `data` a few hundred thousand times while parsing (every token and merge string is one
    slice) and each slice of an np.memmap runs memmap's Python-level __array_finalize__: on the SmolLM2 file (49152
    tokens, 48900 merges) that is 9.3 s of 9.3 s, against 2.7 s with the plain view (same bytes, same mapping,
    measured on the loaded 2-core machine). The property below converts the one assignment the reader makes.
    """

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray)

    return Reader


def _field_value(field):
    """A metadata field as a Python value (str, int, float, bool, or a list of them)."""
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value


# ----------------------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------------------
def gguf_hf_config(f: GGUFFile) -> dict:
    """The Hugging Face config.json dict that the file's metadata describes (see the module docstring)."""
    arch = f.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MiniloraError(f"{f.path}: general.architecture {arch!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    model_type = MODEL_TYPES[arch]
    key = lambda name, kind=int, default=...: f.get(f"{arch}.{name}", kind, default)  # noqa: E731
    if "token_embd.weight" not in f.tensors:
        raise MiniloraError(f"{f.path}: tensor 'token_embd.weight' (the embedding) is missing")
    vocab_size, hidden = f.shape("token_embd.weight")
    n_embd = key("embedding_length")
    if n_embd != hidden:
        raise MiniloraError(f"{f.path}: {arch}.embedding_length is {n_embd} but token_embd.weight has "
                            f"{hidden} columns")
    declared_vocab = key("vocab_size", int, None)
    if declared_vocab is not None and declared_vocab != vocab_size:
        raise MiniloraError(f"{f.path}: {arch}.vocab_size is {declared_vocab} but token_embd.weight has "
                            f"{vocab_size} rows")
    n_heads = key("attention.head_count")
    n_layers = key("block_count")
    head_dim = key("attention.key_length", int, None) or n_embd // n_heads
    rot_dim = key("rope.dimension_count", int, None)
    if arch == "llama" and key("attention.key_length", int, None) is None and rot_dim:
        head_dim = rot_dim  # llama.cpp's llama writes head_dim as the rotary dimension count
    d = {
        "architectures": [HF_CLASSES[model_type]],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": n_embd,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", int, None) or n_heads,
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", float, 1e-6 if arch in GEMMA_ARCHS else 1e-5),
        "max_position_embeddings": key("context_length", int, 4096),
        "rope_theta": key("rope.freq_base", float, 1_000_000.0 if arch == "gemma3" else 10_000.0),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id", int, None),
        "eos_token_id": f.get("tokenizer.ggml.eos_token_id", int, None),
        "pad_token_id": f.get("tokenizer.ggml.padding_token_id", int, None),
        "torch_dtype": "float32",
    }
    if arch in GEMMA_ARCHS:
        d["hidden_activation"] = "gelu_pytorch_tanh"
    if arch == "llama":
        d["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
        d["mlp_bias"] = "blk.0.ffn_down.bias" in f.tensors
    if arch in ("gemma2", "gemma3"):
        big = {"gemma2": 46, "gemma3": 62}[arch]  # llama.cpp's LLM_TYPE_27B layer counts
        d["query_pre_attn_scalar"] = n_embd // n_heads if n_layers == big else head_dim
        window = key("attention.sliding_window", int, None)
        if window:
            d["sliding_window"] = window
    if arch == "gemma2":
        d["attn_logit_softcapping"] = key("attn_logit_softcapping", float, 50.0)
        d["final_logit_softcapping"] = key("final_logit_softcapping", float, 30.0)
    if arch == "gemma3":
        d["rope_local_base_freq"] = 10_000.0
        d["sliding_window_pattern"] = 6
        d["final_logit_softcapping"] = key("final_logit_softcapping", float, None)
    if arch == "phi3":
        if rot_dim and rot_dim != head_dim:
            d["partial_rotary_factor"] = rot_dim / head_dim
        window = key("attention.sliding_window", int, None)
        d["sliding_window"] = window or None
    rope_scaling = _rope_scaling(f, arch, d)
    if rope_scaling:
        d["rope_scaling"] = rope_scaling
        if "original_max_position_embeddings" in rope_scaling and arch == "phi3":
            d["original_max_position_embeddings"] = rope_scaling["original_max_position_embeddings"]
    return d


def _rope_scaling(f: GGUFFile, arch: str, d: dict) -> dict | None:
    """RoPE scaling as a config.json `rope_scaling` dict, from metadata or from llama.cpp's factor tensors."""
    key = lambda name, kind=float, default=None: f.get(f"{arch}.rope.scaling.{name}", kind, default)  # noqa: E731
    original = key("original_context_length", int)
    if "rope_factors_long.weight" in f.tensors:  # Phi-3 LongRoPE: per-pair divisors, long and short contexts
        scaling = {"rope_type": "longrope",
                   "long_factor": f.tensor("rope_factors_long.weight").tolist(),
                   "short_factor": f.tensor("rope_factors_short.weight").tolist()}
        if original:
            scaling["original_max_position_embeddings"] = original
        if key("attn_factor") is not None:
            scaling["attention_factor"] = key("attn_factor")
        return scaling
    if "rope_freqs.weight" in f.tensors:
        # Llama 3.1-style: llama.cpp bakes the llama3 frequency rule into one divisor per rotating pair.
        # LongRoPE with equal short/long lists and attention factor 1 divides the frequencies the same way.
        factors = f.tensor("rope_freqs.weight").tolist()
        return {"rope_type": "longrope", "short_factor": factors, "long_factor": factors, "factor": 1.0,
                "attention_factor": 1.0, "original_max_position_embeddings": d["max_position_embeddings"]}
    kind = key("type", str)
    if kind in (None, "none"):
        return None
    factor = key("factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor or 1.0}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor or 1.0}
        if original:
            scaling["original_max_position_embeddings"] = original
        for name, hf_name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if key(name) is not None:
                scaling[hf_name] = key(name)
        return scaling
    raise MiniloraError(f"{f.path}: {arch}.rope.scaling.type {kind!r} is not supported; supported: none, linear, "
                        "yarn")


def gguf_model_config(f: GGUFFile) -> ModelConfig:
    """ModelConfig of the file (its hf_config is the config.json that gguf_hf_config builds)."""
    try:
        return ModelConfig.from_hf_dict(gguf_hf_config(f))
    except MiniloraError as e:  # config.py's messages say "config.json: <HF field>"; name the GGUF keys instead
        message = str(e).removeprefix("config.json: ")
        for hf_name, key in HF_TO_GGUF_KEYS.items():
            message = message.replace(hf_name, f"{f.architecture}.{key}")
        raise MiniloraError(f"{f.path}: metadata: {message}") from None


# ----------------------------------------------------------------------------------------------------------
# The tensors
# ----------------------------------------------------------------------------------------------------------
def minilora_name(gguf_name: str, config: ModelConfig) -> str | None:
    """minilora's parameter name for a GGUF tensor name; None for an unknown name."""
    top, _, suffix = gguf_name.rpartition(".")
    if top in TOP_NAMES and suffix in ("weight", "bias"):
        return f"{TOP_NAMES[top]}.{suffix}"
    m = _BLOCK.fullmatch(gguf_name)
    if m is None or m[2] not in BLOCK_NAMES:
        return None
    part = BLOCK_NAMES[m[2]]
    if m[2] == "ffn_norm" and config.sandwich_norm:
        part = "pre_feedforward_layernorm"
    if m[2] == "ffn_up" and config.fused_gate_up:
        part = "mlp.gate_up_proj"
    return f"model.layers.{m[1]}.{part}.{m[3]}"


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (its LlamaModel.permute) for one projection of `n_heads` heads.

    Hugging Face rotates the two halves of each head, (x_i, x_{i+D/2}); ggml rotates adjacent pairs
    (x_{2i}, x_{2i+1}). The converter reorders each head's D rows from [half 0 | half 1] to interleaved
    [0, D/2, 1, D/2+1, ...]; here rows go back: (H, D/2, 2, ...) -> (H, 2, D/2, ...). Works for biases (1-D) too.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(f: GGUFFile, config: ModelConfig):
    """Yield (minilora name, float32 tensor) for each model weight of the file, one at a time, quirks undone.

    One at a time so a caller can cast or quantize each and drop the float32 copy before the next is read.
    """
    arch = f.architecture
    for name in f.tensors:
        if name in ROPE_TENSORS:
            continue  # read into the config's rope scaling
        target = minilora_name(name, config)
        if target is None:
            raise MiniloraError(f"{f.path}: unexpected tensor {name!r} for architecture {arch!r}")
        w = f.tensor(name)
        if arch == "llama" and re.search(r"\.attn_[qk]\.", name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            if w.shape[0] % (2 * heads):
                raise MiniloraError(f"{f.path}: tensor {name!r} has {w.shape[0]} rows, not a multiple of 2 x "
                                    f"{heads} heads ({arch}.attention.head_count{'_kv' if '_k.' in name else ''})")
            w = unpermute_qk(w, heads)
        if arch in GEMMA_ARCHS and name.endswith("norm.weight"):
            w = w - 1.0  # stored as 1 + w; subtracted in float32, before any cast
        yield target, w
        del w


def read_gguf(path):
    """(ModelConfig, iterator of (minilora name, float32 tensor)) for a GGUF file or a folder holding one."""
    file = find_gguf(path)
    if file is None:
        raise MiniloraError(f"{path} is not a .gguf file or a folder holding one")
    f = GGUFFile(file)
    config = gguf_model_config(f)
    return config, gguf_tensors(f, config)


def check_tokenizer_size(f: GGUFFile, vocab_size: int) -> None:
    """The vocabulary (tokenizer.ggml.tokens) must have one token per embedding row."""
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != vocab_size:
        raise MiniloraError(f"{f.path}: tokenizer.ggml.tokens has {len(tokens)} tokens but token_embd.weight has "
                            f"{vocab_size} rows: the tokenizer does not belong to this model")


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
def load_gguf_model(path, dtype=None, device=None, quantize=None, quant_backend: str = "auto"):
    """Build the Transformer a GGUF file describes and load its weights, dequantized to `dtype` (default float32).

    Same arguments as formats.load_model. With quantize="nf4" each block linear is re-quantized to NF4 as soon as
    it is dequantized, and its float copy dropped before the next tensor is read, so the peak is the 4-bit model
    plus the dense embeddings/norms plus one float32 tensor in flight — never the whole float model
    (benchmarks/load_memory.py measures it).
    """
    from ..model import Transformer
    from ..quant.bnb_checkpoint import BLOCKSIZE, block_linear_names, install_nf4_linears
    from ..quant.nf4 import quantize_nf4

    file = find_gguf(path)
    if file is None:
        raise MiniloraError(f"{path} is not a .gguf file or a folder holding one")
    if quantize not in (None, "nf4"):
        raise MiniloraError(f"quantize must be None or 'nf4', got {quantize!r}")
    name = str(dtype if dtype is not None else "float32").removeprefix("torch.")
    if name not in SUPPORTED_DTYPES:
        raise MiniloraError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {dtype!r}")
    dtype = getattr(torch, name)
    device = torch.device(device or "cpu")
    f = GGUFFile(file)
    config = gguf_model_config(f)
    check_tokenizer_size(f, config.vocab_size)

    with torch.device("meta"):
        model = Transformer(config)  # shapes only: no memory, no random init
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    to_quantize = {f"{n}.weight" for n in block_linear_names(model)} if quantize else set()
    state = {}
    for name, w in gguf_tensors(f, config):
        if name not in expected:
            raise MiniloraError(f"{file}: tensor for {name!r} is not part of the model its metadata describes "
                                f"({f.architecture}, {config.num_hidden_layers} blocks)")
        if tuple(w.shape) != expected[name]:
            raise MiniloraError(f"{file}: tensor {_gguf_name(name)!r} has shape {tuple(w.shape)} but the metadata "
                                f"({_shape_fields(f.architecture)}) implies {expected[name]}")
        t = w.to(device=device, dtype=dtype)
        del w
        state[name] = quantize_nf4(t, BLOCKSIZE, double_quant=True) if name in to_quantize else t
        del t
    missing = sorted(set(expected) - set(state))
    if missing:
        raise MiniloraError(f"{file}: tensor {_gguf_name(missing[0])!r} is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                            + f"; the file does not match its metadata ({f.architecture})")
    install_nf4_linears(model, state, dtype, quant_backend)  # no-op unless quantized
    model.load_state_dict(state, strict=not quantize, assign=True)
    return model.eval()


def _gguf_name(name: str) -> str:
    """The GGUF spelling of a minilora parameter name, for error messages."""
    for gguf_top, top in TOP_NAMES.items():
        if name.startswith(top + "."):
            return gguf_top + name[len(top):]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        inverse = {v: k for k, v in BLOCK_NAMES.items()}
        inverse.update({"pre_feedforward_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up"})
        return f"blk.{m[1]}.{inverse.get(m[2], m[2])}.{m[3]}"
    return name


def _shape_fields(arch: str) -> str:
    return ", ".join(f"{arch}.{k}" for k in ("embedding_length", "feed_forward_length", "attention.head_count",
                                              "attention.head_count_kv", "attention.key_length", "block_count"))
