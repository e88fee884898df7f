"""ModelConfig: the architecture of a Hugging Face checkpoint, read from its config.json.

A Hugging Face `config.json` names the family (`model_type`) and a few dozen numbers. Families differ in small,
well-known ways (Gemma scales its embeddings, Qwen2 puts a bias on q/k/v, Phi-3 fuses its projections...), so
`from_hf_dict` turns each family's conventions into explicit feature flags and the model in `model.py` has no
`if model_type == ...` anywhere.

Two dialects of config.json exist on the hub and both are read:
- transformers 4: `rope_theta`, `rope_scaling` (with `type` or `rope_type`), `torch_dtype`,
  `sliding_window_pattern` and `rope_local_base_freq` (Gemma 3);
- transformers 5: `rope_parameters` (flat, or per layer type: {"full_attention": {...}, "sliding_attention": {...}}),
  `dtype`, `layer_types`.
Keys a file leaves out take the defaults of the family's transformers config class (e.g. Gemma ties its
embeddings unless told otherwise).

RoPE scaling (rope.py has the formulas): default, linear, llama3, yarn and longrope. Old Phi-3 configs spell
longrope "su" (and Phi-3's "yarn" means longrope too, as transformers' Phi3Config reads it). Where the pre-training
length `original_max_position_embeddings` sits differs: inside the rope dict (Llama 3.1, Qwen YaRN) or at the top
level (Phi-3); like transformers, a top-level value wins, and Phi-3 defaults it to 4096.

Deliberately not handled (a clear MiniloraError says so): other families, multimodal wrappers (`gemma3`),
dynamic NTK RoPE scaling, bidirectional attention.
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MiniloraError
from .files import read_json_object
from .rope import longrope_attention_factor, yarn_attention_factor

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
LAYER_TYPES = ("full_attention", "sliding_attention")
# activation name in config.json -> the function model.py applies
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
GEMMA_FAMILY = ("gemma", "gemma2", "gemma3_text")
# Top-level config.json fields and the type each must have (null = absent). Checked before anything reads them, so
# `"hidden_size": "128"` or `"tie_word_embeddings": "no"` is an error naming the field, not a TypeError later or a
# string taken as true. (minimum, kind): kind "int" (no bools, no floats; >= minimum), "number" (int or float;
# >= minimum), "positive" (a number > 0), "bool".
FIELD_TYPES = {
    **{name: (1, "int") for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "head_dim",
                                     "max_position_embeddings", "sliding_window", "original_max_position_embeddings",
                                     "sliding_window_pattern")},
    "max_window_layers": (0, "int"),
    **{name: (0, "int") for name in ("bos_token_id", "pad_token_id")},
    "rms_norm_eps": (0, "number"),  # < 0 makes x² mean + eps negative for small x: NaN from the first step
    **{name: (0, "positive") for name in ("rope_theta", "rope_local_base_freq", "partial_rotary_factor",
                                          "query_pre_attn_scalar", "attn_logit_softcapping",
                                          "final_logit_softcapping")},
    **{name: (None, "bool") for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
                                         "use_bidirectional_attention")},
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters of one layer type (see rope.py for the formulas)."""

    theta: float = 10_000.0  # base of the geometric frequency ladder (RoFormer, Su et al. 2021, eq. 15)
    rope_type: str = "default"  # "default", "linear", "llama3", "yarn" or "longrope" (see rope.py)
    factor: float = 1.0  # linear / llama3 / yarn / longrope: how much longer the context became
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / low_freq_factor are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3 / yarn / longrope: the pre-training context length
    beta_fast: float = 32.0  # yarn: pairs turning more often than this within original_max keep their frequency
    beta_slow: float = 1.0  # yarn: pairs turning less often than this are divided by factor
    truncate: bool = True  # yarn: round the ramp's ends outwards to whole pairs
    short_factor: tuple[float, ...] = ()  # longrope: per-pair rescale while a sequence fits in original_max
    long_factor: tuple[float, ...] = ()  # longrope: per-pair rescale for longer sequences
    attention_factor: float = 1.0  # yarn / longrope: cos and sin are multiplied by this (scores by its square)
    partial_rotary_factor: float = 1.0  # share of each head's dims that rotate (Phi-3 may use < 1)

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise unsupported("rope type", self.rope_type, SUPPORTED_ROPE_TYPES)
        if self.theta <= 0 or self.factor <= 0 or not 0 < self.partial_rotary_factor <= 1:
            raise MiniloraError(f"config.json: bad rope parameters {self}")
        for name in ("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"):
            if getattr(self, name) <= 0:
                raise MiniloraError(f"config.json: rope {name} must be positive, got {getattr(self, name)}")
        if self.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if not getattr(self, name) or min(getattr(self, name)) <= 0:
                    raise MiniloraError(f"config.json: longrope {name} must be a list of positive numbers")


@dataclass
class ModelConfig:
    model_type: str  # Hugging Face family name, one of SUPPORTED_MODEL_TYPES
    vocab_size: int  # V
    hidden_size: int  # C, the residual stream width
    intermediate_size: int  # width of the gated MLP
    num_hidden_layers: int  # number of transformer blocks
    num_attention_heads: int  # query heads H
    num_key_value_heads: int  # key/value heads; H / KV query heads share each (grouped-query attention)
    head_dim: int  # D; usually C / H, but Gemma and Qwen3 may set it freely
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"  # MLP gate activation: "silu", "gelu_tanh" (GeGLU) or "gelu"
    tie_word_embeddings: bool = False  # the output projection reuses the input embedding matrix
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; `attention_bias` elsewhere)
    o_bias: bool = False  # bias on the output projection (`attention_bias` on Llama/Gemma/Qwen3)
    mlp_bias: bool = False  # bias on the MLP projections (Llama `mlp_bias`)
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # Gemma: RMSNorm multiplies by (1 + w), with w stored around 0
    sandwich_norm: bool = False  # Gemma 2/3: also normalise each sub-layer's output, and before the MLP
    scale_embeddings: bool = False  # Gemma: embeddings * sqrt(C)
    fused_qkv: bool = False  # Phi-3: one `qkv_proj` instead of q_proj/k_proj/v_proj
    fused_gate_up: bool = False  # Phi-3: one `gate_up_proj` instead of gate_proj/up_proj
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5 (Gemma 2/3: query_pre_attn_scalar ** -0.5)
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    sliding_window: int | None = None  # tokens a sliding-attention layer sees (itself included)
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" or "sliding_attention"; () = all full
    rope: dict[str, RopeConfig] = field(default_factory=dict)  # per layer type; missing = RopeConfig()
    max_position_embeddings: int = 4096
    dtype: str | None = None  # the checkpoint's dtype per config.json, if it says
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_config: dict = field(default_factory=dict, repr=False, compare=False)  # the original config.json

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = ("full_attention",) * self.num_hidden_layers
        self.layer_types = tuple(self.layer_types)
        for lt in LAYER_TYPES:
            self.rope.setdefault(lt, RopeConfig())
        if self.attn_scale is None:
            self.attn_scale = self.head_dim**-0.5
        self._check()

    def _check(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise MiniloraError(f"config.json: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MiniloraError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise MiniloraError(
                f"config.json: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        for lt in self.layer_types:
            if lt not in LAYER_TYPES:
                raise unsupported("layer type", lt, LAYER_TYPES)
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise MiniloraError("config.json: sliding_attention layers need a positive sliding_window")
        if self.hidden_act not in ("silu", "gelu_tanh", "gelu"):
            raise MiniloraError(f"config.json: activation {self.hidden_act!r} is not supported")
        if self.dtype is not None and self.dtype not in SUPPORTED_DTYPES:
            raise unsupported("dtype", self.dtype, SUPPORTED_DTYPES)
        pairs = self.rotary_dim // 2
        for r in self.rope.values():
            if r.rope_type != "longrope":
                continue
            for name in ("short_factor", "long_factor"):
                if len(getattr(r, name)) != pairs:
                    raise MiniloraError(
                        f"config.json: longrope {name} has {len(getattr(r, name))} numbers, expected one per "
                        f"rotating dim pair: {pairs} (head_dim {self.head_dim} x partial_rotary_factor "
                        f"{r.partial_rotary_factor} / 2)"
                    )

    def window(self, layer_type: str) -> int | None:
        """Keys a query of this layer type sees (itself included): sliding_window, or None for all of them.

        One rule for both places that depend on it: the attention mask and what the KV cache keeps.
        """
        return self.sliding_window if layer_type == "sliding_attention" else None

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotate (the rest pass through), as transformers computes it."""
        return int(self.head_dim * self.rope["full_attention"].partial_rotary_factor)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Map a config.json dict (either dialect) onto ModelConfig; MiniloraError for anything unsupported."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            hint = " (for Gemma 3, give the text model: model_type 'gemma3_text')" if model_type == "gemma3" else ""
            raise MiniloraError(
                f"config.json: model_type {model_type!r} is not supported{hint}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        check_field_types(d)
        if d.get("use_bidirectional_attention"):
            raise MiniloraError(f"config.json: use_bidirectional_attention is not supported ({model_type})")
        gemma = model_type in GEMMA_FAMILY

        def need(key):
            if d.get(key) is None:
                raise MiniloraError(f"config.json: required field {key!r} is missing ({model_type})")
            return d[key]

        hidden_size, n_heads = need("hidden_size"), need("num_attention_heads")
        n_layers = need("num_hidden_layers")
        default_head_dim = {"gemma": 256, "gemma2": 256, "gemma3_text": 256, "qwen3": 128}
        head_dim = d.get("head_dim") or default_head_dim.get(model_type) or hidden_size // n_heads
        # `attention_bias` puts a bias on q/k/v/o; Qwen2 has q/k/v biases always and o never; Mistral/Phi-3 none.
        attention_bias = bool(d.get("attention_bias", False)) and model_type not in ("mistral", "phi3")
        sliding_window, layer_types = _attention_layout(d, model_type, n_layers)
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5 if model_type == "phi3" else 1e-6),
            hidden_act=_activation(d, model_type),
            tie_word_embeddings=d.get("tie_word_embeddings", gemma),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)) and model_type == "llama",
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_plus_one=gemma,
            sandwich_norm=model_type in ("gemma2", "gemma3_text"),
            scale_embeddings=gemma,
            fused_qkv=model_type == "phi3",
            fused_gate_up=model_type == "phi3",
            attn_scale=d.get("query_pre_attn_scalar", 256) ** -0.5 if model_type in ("gemma2", "gemma3_text") else None,
            attn_logit_softcap=d.get("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
            final_logit_softcap=d.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
            sliding_window=sliding_window,
            layer_types=layer_types,
            rope=_rope(d, model_type),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            dtype=_dtype_name(d),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hf_config=copy.deepcopy(d),
        )


def check_field_types(d: dict) -> None:
    """MiniloraError naming the first field of FIELD_TYPES (or eos_token_id) whose value has the wrong type or is
    below its minimum."""
    for name, (minimum, kind) in FIELD_TYPES.items():
        value = d.get(name)
        if value is None:
            continue
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            expected = {"bool": "true or false", "int": "an integer"}.get(kind, "a number")
            raise MiniloraError(f"config.json: {name} must be {expected}, got {value!r} ({type(value).__name__}); "
                                "fix config.json (JSON numbers and booleans are written without quotes)")
        if kind == "positive" and not value > 0:
            raise MiniloraError(f"config.json: {name} must be positive, got {value!r}; fix config.json")
        if minimum is not None and kind != "positive" and not value >= minimum:  # NaN fails too
            raise MiniloraError(f"config.json: {name} must be at least {minimum}, got {value!r}; fix config.json")
    eos = d.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise MiniloraError(f"config.json: eos_token_id must be an integer id or a list of them, got {eos!r}")


def unsupported(what: str, value, supported) -> MiniloraError:
    """The error for a config value minilora does not implement, listing what it does."""
    return MiniloraError(f"config.json: {what} {value!r} is not supported; supported: {', '.join(supported)}")


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json` into a ModelConfig (clear errors for a missing folder or file)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MiniloraError(f"model folder not found: {model_dir}")
    path = model_dir / "config.json"
    if not path.is_file():
        raise MiniloraError(f"no config.json in {model_dir}: is it a Hugging Face model folder?")
    d = read_json_object(path, hint="re-download or re-save the model")
    try:
        return ModelConfig.from_hf_dict(d)
    except MiniloraError as e:  # messages start with "config.json: "; say which folder
        raise MiniloraError(f"{model_dir}{'/' if str(e).startswith('config.json') else ': '}{e}") from None


def _activation(d: dict, model_type: str) -> str:
    default = "gelu_pytorch_tanh" if model_type in GEMMA_FAMILY else "silu"
    name = d.get("hidden_activation") or d.get("hidden_act") or default
    if model_type == "gemma" and name == "gelu":
        # Gemma's released configs say "gelu" but the model was trained with the tanh approximation; transformers
        # swaps it the same way (GemmaConfig.__post_init__).
        name = "gelu_pytorch_tanh"
    if name not in ACTIVATIONS:
        raise unsupported("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


def _dtype_name(d: dict) -> str | None:
    name = d.get("dtype") or d.get("torch_dtype")
    if name is None:
        return None
    name = str(name).removeprefix("torch.")
    return {"float": "float32", "half": "float16", "bf16": "bfloat16"}.get(name, name)


def _attention_layout(d: dict, model_type: str, n_layers: int) -> tuple[int | None, tuple[str, ...]]:
    """Which layers use sliding-window attention, and how wide the window is."""
    window = d.get("sliding_window", 4096 if model_type in ("mistral", "gemma2", "gemma3_text") else None)
    full, sliding = LAYER_TYPES
    if model_type in ("qwen2", "qwen3"):
        # Qwen only slides when `use_sliding_window`, and then only in layers >= max_window_layers.
        if not d.get("use_sliding_window", False):
            return None, (full,) * n_layers
        default = tuple(sliding if i >= d.get("max_window_layers", 28) else full for i in range(n_layers))
        return window, tuple(d.get("layer_types") or default)
    if model_type in ("mistral", "phi3"):
        # One window for every layer (transformers ignores `layer_types` for these families).
        return window, ((sliding if window else full),) * n_layers
    if model_type == "gemma2":
        # Alternating: even layers slide, odd layers see everything.
        default = tuple(sliding if (i + 1) % 2 else full for i in range(n_layers))
        return window, tuple(d.get("layer_types") or default)
    if model_type == "gemma3_text":
        # Every `sliding_window_pattern`-th layer is global (5 local : 1 global in the released models).
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        default = tuple(sliding if (i + 1) % pattern else full for i in range(n_layers))
        return window, tuple(d.get("layer_types") or default)
    return None, (full,) * n_layers  # llama, gemma


def _rope(d: dict, model_type: str) -> dict[str, RopeConfig]:
    """RoPE parameters per layer type, from either dialect."""
    params = d.get("rope_parameters")  # transformers 5
    nested = isinstance(params, dict) and any(k in params for k in LAYER_TYPES)
    if model_type == "gemma3_text":
        if nested:
            full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
            full.setdefault("rope_theta", 1_000_000.0)  # Gemma3TextConfig.default_theta
            local.setdefault("rope_theta", 10_000.0)
        else:  # transformers 4: rope_theta + rope_scaling act on global layers, rope_local_base_freq on local ones
            full = dict(params or d.get("rope_scaling") or {})
            full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
            local = {"rope_theta": d.get("rope_local_base_freq", 10_000.0)}
        return {"full_attention": _rope_one(full, d), "sliding_attention": _rope_one(local, d)}
    if nested:
        return {lt: _rope_one(params.get(lt) or {}, d) for lt in LAYER_TYPES}
    # One rope dict for all layers: a top-level original_max_position_embeddings overrides the dict's, as
    # transformers' standardize_rope_params does (Phi3Config always has one: 4096 unless the file says otherwise).
    top_original_max = d.get("original_max_position_embeddings", 4096 if model_type == "phi3" else None)
    one = _rope_one(dict(params or d.get("rope_scaling") or {}), d, top_original_max)
    return {lt: one for lt in LAYER_TYPES}


def _rope_one(p: dict, d: dict, top_original_max: int | None = None) -> RopeConfig:
    """One rope dict (rope_parameters or rope_scaling) + top-level fallbacks -> RopeConfig."""
    rope_type = p.get("rope_type") or p.get("type") or "default"
    if rope_type == "su" or (rope_type == "yarn" and d.get("model_type") == "phi3"):
        rope_type = "longrope"  # Phi-3's older names for it (transformers' Phi3Config renames both)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise unsupported("rope type", rope_type, SUPPORTED_ROPE_TYPES)
    if rope_type == "yarn" and p.get("factor") is None:
        raise MiniloraError("config.json: rope type 'yarn' needs a 'factor' (how much longer the context became)")
    original_max = int(
        top_original_max or _number(p, "original_max_position_embeddings") or d.get("max_position_embeddings") or 8192
    )
    factor, attention_factor = 1.0, 1.0  # attention_factor: what cos and sin are multiplied by (rope.py)
    if rope_type in ("linear", "llama3"):
        factor = _number(p, "factor", 1.0)
    elif rope_type == "yarn":
        factor = _number(p, "factor")
        attention_factor = yarn_attention_factor(factor, _number(p, "mscale"), _number(p, "mscale_all_dim"))
    elif rope_type == "longrope":
        # Phi-3 gives no factor: the extension is the ratio of the two lengths (131072 / 4096 = 32 for -128k).
        factor = _number(p, "factor", (d.get("max_position_embeddings") or original_max) / original_max)
        attention_factor = longrope_attention_factor(factor, original_max)
    return RopeConfig(
        theta=_number(p, "rope_theta") or _number(d, "rope_theta") or 10_000.0,
        rope_type=rope_type,
        factor=factor,
        low_freq_factor=_number(p, "low_freq_factor", 1.0),
        high_freq_factor=_number(p, "high_freq_factor", 4.0),
        original_max_position_embeddings=original_max,
        beta_fast=_number(p, "beta_fast") or 32.0,  # 0 / null mean the default, as in transformers
        beta_slow=_number(p, "beta_slow") or 1.0,
        truncate=bool(p.get("truncate", True)),
        short_factor=_factor_list(p, "short_factor") if rope_type == "longrope" else (),
        long_factor=_factor_list(p, "long_factor") if rope_type == "longrope" else (),
        attention_factor=_number(p, "attention_factor", attention_factor),  # a given value wins
        partial_rotary_factor=_number(p, "partial_rotary_factor") or _number(d, "partial_rotary_factor") or 1.0,
    )


def _number(p: dict, key: str, default: float | None = None) -> float | None:
    """p[key] as a float (default if absent or null); MiniloraError naming the key for anything else."""
    value = p.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MiniloraError(f"config.json: rope {key} must be a number, got {value!r}")
    return float(value)


def _factor_list(p: dict, key: str) -> tuple[float, ...]:
    """A longrope factor list (one number per rotating dim pair) as a tuple; MiniloraError naming the key."""
    value = p.get(key)
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        raise MiniloraError(f"config.json: longrope {key} must be a list of numbers, got {shown}")
    return tuple(float(x) for x in value)
