"""A decoder-only transformer that runs Llama, Mistral, Qwen2/3, Gemma 1/2/3 and Phi-3 checkpoints.

One block for all families (Llama's layout; "Attention Is All You Need" with the now-standard changes):
    h = h + Attention(RMSNorm(h))          # grouped-query attention with rotary positions (rope.py)
    h = h + MLP(RMSNorm(h))                # gated: down(act(gate(x)) * up(x))  (SwiGLU / GeGLU, Shazeer 2020)
and the family differences are flags of ModelConfig (config.py): Gemma's (1 + w) norms and sqrt(C)-scaled
embeddings, Gemma 2/3's extra "sandwich" norms, tanh soft-capping and sliding-window layers, Qwen's q/k biases
and q/k norms, Phi-3's fused projections.

Module names are Hugging Face's (`model.layers.0.self_attn.q_proj`, ...), so `state_dict()` keys equal the
checkpoint's keys and LoRA/PEFT adapters address the same names. Every projection is an `nn.Linear` (cpu_matmul.Linear,
a subclass whose training products run through oneDNN on the CPU), so LoRA can wrap any of them by name.

The attention mask is built here, explicitly, from three ingredients: causality (plus a sliding window on some
layers), a (B, T) padding mask, and optional segment ids for packed samples (block-diagonal: a token sees only
earlier tokens of its own segment). On CUDA, packed samples skip the dense mask: PackedSegments runs one causal
SDPA call per bucket of similar segment lengths, so the flash kernel stays usable.

When a gradient is wanted, float32 RMSNorm and SwiGLU run as the autograd functions of fused_ops.py (the same
values; they keep less for backward).

Not handled: dropout (inference and LoRA fine-tuning of these models use none), bidirectional attention, dynamic
NTK RoPE scaling, mixture-of-experts.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, RopeConfig
from .cpu_matmul import Linear
from .fused_ops import rms_norm, swiglu
from .packed_weights import packed_linear
from .rope import (inverse_frequencies, longrope_inverse_frequencies, rope_cos_sin, rotate, rotation_tables,
                   yarn_inverse_frequencies)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding.

    Keys are stored after RoPE, so a new token only computes its own q/k/v. Each layer writes into a preallocated
    buffer (B, KV, capacity, D) at an index, so a decoding step copies only its own key and value, never the past
    (appending with torch.cat copies every cached key at every step: quadratic in the length). `max_len`, when the
    caller knows it (generate: prompt + new tokens), sizes a full-attention layer's buffer once; without it the
    buffer doubles when full (amortised O(1) per token).

    A sliding-window layer keeps only what a later query can still see, its `window - 1` newest keys (a query sees
    `window` keys, itself included), so for Gemma 2/3 or Mistral v0.1 the cache of those layers stops growing at
    the window instead of with the text. Its buffer holds about two windows; when it is full the window - 1 kept
    keys move to the front: one copy of a window every ~window steps instead of every step, and the keys stay in
    order, so the attention mask is the same as for a full layer (keys first_kept_key..S-1).
    """

    def __init__(self, max_len: int | None = None):
        self.max_len = max_len  # tokens the cache will ever see, when known: the full layers' capacity
        self._k: list[torch.Tensor] = []  # per layer (B, KV, capacity, D); buffer index i holds token base + i
        self._v: list[torch.Tensor] = []
        self._base: list[int] = []  # token index held at buffer index 0
        self._end: list[int] = []  # buffer indices [0, end) are filled
        self.windows: list[int | None] = []  # per layer: its sliding window, None for full attention
        self.seen: list[int] = []  # per layer: tokens that went through it, kept or not

    @property
    def seq_len(self) -> int:
        """Tokens already processed (S): the position the next token takes."""
        return self.seen[0] if self.seen else 0

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per layer, the keys kept for later queries (B, KV, S_kept, D): views into the buffers."""
        return [self._kept(i, self._k[i]) for i in range(len(self._k))]

    @property
    def values(self) -> list[torch.Tensor]:
        return [self._kept(i, self._v[i]) for i in range(len(self._v))]

    def _kept(self, i: int, buf: torch.Tensor) -> torch.Tensor:
        return buf[:, :, first_kept_key(self.seen[i], self.windows[i]) - self._base[i]:self._end[i]]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, window: int | None = None):
        """Write this step's k, v (B, KV, T, D) into layer `layer_idx`; return the keys and values this step attends
        over: all of them (B, KV, S + T, D), or for a sliding layer the kept ones + T (from first_kept_key)."""
        T = k.shape[2]
        if layer_idx == len(self._k):
            self._k.append(k.new_empty(0))
            self._v.append(v.new_empty(0))
            self._base.append(0)
            self._end.append(0)
            self.windows.append(window)
            self.seen.append(0)
        i = layer_idx
        first = first_kept_key(self.seen[i], window)  # the oldest key this step's queries may see
        if self._end[i] + T > self._capacity(i):
            self._make_room(i, first, T, k)
        end = self._end[i]
        self._k[i][:, :, end:end + T] = k
        self._v[i][:, :, end:end + T] = v
        self._end[i] = end + T
        self.seen[i] += T
        start = first - self._base[i]
        return self._k[i][:, :, start:end + T], self._v[i][:, :, start:end + T]

    def _capacity(self, i: int) -> int:
        return self._k[i].shape[2] if self._k[i].ndim == 4 else 0

    def _make_room(self, i: int, first: int, T: int, like: torch.Tensor) -> None:
        """Drop the keys before token `first`, then (if T still does not fit) move to a larger buffer."""
        keep = slice(first - self._base[i], self._end[i])
        n_kept = self._end[i] - (first - self._base[i])
        window = self.windows[i]
        need = n_kept + T
        if self._capacity(i) < need:
            if window is not None:  # about two windows: the kept keys move to the front once per ~window steps
                capacity = max(need, 2 * window)
            else:  # max_len once, or doubling (also when a caller's max_len was too small)
                capacity = self.max_len if self.max_len and need <= self.max_len else max(need, 2 * self._capacity(i))
            if self.max_len and need <= self.max_len:
                capacity = min(capacity, self.max_len)  # never more than the whole text
            B, KV, _, D = like.shape
            new_k = like.new_empty(B, KV, capacity, D)
            new_v = like.new_empty(B, KV, capacity, D)
        else:
            new_k, new_v = self._k[i], self._v[i]
        if n_kept:  # clone: source and destination may overlap in the same buffer
            new_k[:, :, :n_kept] = self._k[i][:, :, keep].clone()
            new_v[:, :, :n_kept] = self._v[i][:, :, keep].clone()
        self._k[i], self._v[i] = new_k, new_v
        self._base[i], self._end[i] = first, n_kept


def first_kept_key(n_tokens: int, window: int | None) -> int:
    """Index of the oldest key a layer's cache holds after n_tokens: 0, or for a sliding window the first of the
    window - 1 newest (the only keys the next query, which sees `window` keys with itself, can reach)."""
    return 0 if window is None else max(0, n_tokens - (window - 1))


class RMSNorm(nn.Module):
    """x / rms(x) * w (Zhang & Sennrich 2019), computed in float32.

    Gemma stores w around 0 and multiplies by (1 + w), in float32 before rounding; the others round first and then
    multiply by w. Both orders are kept exactly so bf16 outputs match the reference implementations.
    """

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.plus_one and x.dtype == self.weight.dtype == torch.float32:
            if _wants_grad(x, self.weight):
                return rms_norm(x, self.weight, self.eps)  # same values, saves less for backward (fused_ops.py)
            if x.device.type == "cpu":  # torch's op runs these same float32 ops on the CPU: one call instead of six
                return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention: H query heads share KV key/value heads (Ainslie et al. 2023)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding_window = cfg.window(cfg.layer_types[layer_idx])  # None: a full-attention layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcap
        C, q_dim, kv_dim = cfg.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if cfg.fused_qkv:
            self.qkv_proj = Linear(C, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        else:
            self.q_proj = Linear(C, q_dim, bias=cfg.qkv_bias)
            self.k_proj = Linear(C, kv_dim, bias=cfg.qkv_bias)
            self.v_proj = Linear(C, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_dim, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)

    def project(self, x: torch.Tensor):
        """q (B, T, H, D), k and v (B, T, KV, D)."""
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # cos, sin: rotation_tables (B, 1, T, rotary_dim)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, self.sliding_window)  # (B, KV, S, D), S = kept + T
        # Each group of H / KV query heads reads the same key/value head: enable_gqa lets SDPA index the shared
        # head instead of materialising K/V repeated H / KV times (a copy of the whole cache per step and layer).
        if isinstance(mask, PackedSegments):
            y = mask.attention(q, k, v, self.scale)  # packed samples, one causal call per segment bucket
        elif self.softcap is None:
            # mask None = plain causal: is_causal lets SDPA pick its fastest (flash) kernel on GPU. A single query
            # (a decoding step) sees every key it is given, and SDPA's is_causal would align it with the first one.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads)
        else:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * D)
        return self.o_proj(y)


class PackedSegments:
    """Packed samples attended one causal block at a time, with no (B, 1, T, T) mask: the CUDA path.

    A dense boolean mask rules out SDPA's flash kernel on a GPU (it takes no mask), and costs B·T² bytes per layer
    type. Instead the segments (maximal runs of one segment id in a row; padding, id 0, is a segment of its own) are
    grouped into buckets by their length rounded up to a power of two (>= 16); each bucket is gathered into a
    (n, heads, L, D) batch and run with is_causal=True, so attention makes one SDPA call per bucket (at most
    log2(T) - 3) and a causal-only kernel sees it. A segment shorter than its bucket is padded at its end with
    copies of its last token: under causality its real queries never see those keys, and their outputs are
    dropped. The plan is built once per forward (segment ids read on the host: one sync), shared by the layers.
    On the CPU it was 1.12x faster than the dense mask too (4 SmolLM2 layers, B 4, T 512, segments of 20-200
    tokens, forward + backward, 1 thread), but the CPU keeps the mask unless asked (per_segment_attention).
    """

    def __init__(self, segment_ids: torch.Tensor):
        B, T = segment_ids.shape
        seg = segment_ids.cpu()
        buckets: dict[int, list[tuple[int, int]]] = {}  # bucket length -> [(flat start, length)]
        for b in range(B):
            starts = [0] + [t for t in range(1, T) if seg[b, t] != seg[b, t - 1]] + [T]
            for s, e in zip(starts, starts[1:]):
                L = max(16, 1 << (e - s - 1).bit_length())
                buckets.setdefault(L, []).append((b * T + s, e - s))
        self.buckets = []  # [(index (n, L) into the B·T tokens, valid (n, L))]
        flat = []  # the token each valid bucket position holds, in bucket order
        for L, segs in sorted(buckets.items()):
            j = torch.arange(L)
            start = torch.tensor([s for s, _ in segs])[:, None]
            length = torch.tensor([n for _, n in segs])[:, None]
            index = start + torch.minimum(j, length - 1)  # (n, L): past its end a segment repeats its last token
            valid = j < length  # (n, L)
            self.buckets.append((index.to(segment_ids.device), valid.to(segment_ids.device)))
            flat.append(index[valid])
        self.order = torch.cat(flat).argsort().to(segment_ids.device)  # bucket order -> token order, (B·T,)

    def attention(self, q, k, v, scale: float) -> torch.Tensor:
        """Causal attention within each segment: q (B, H, T, D), k, v (B, KV, T, D) -> (B, H, T, D)."""
        B, H, T, D = q.shape
        KV = k.shape[1]
        q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v))  # (B·T, heads, D)
        pieces = []
        for index, valid in self.buckets:
            qs, ks, vs = (x[index].transpose(1, 2) for x in (q, k, v))  # (n, L, heads, D) -> (n, heads, L, D)
            y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=H != KV)
            pieces.append(y.transpose(1, 2)[valid])  # (n_valid, H, D)
        y = torch.cat(pieces).index_select(0, self.order)  # back to token order: (B·T, H, D)
        return y.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)


def softcapped_attention(q, k, v, mask, scale: float, softcap: float):
    """softmax(cap * tanh(q k^T * scale / cap)) v, written out: the fused SDPA kernels have no soft-capping.

    Gemma 2 caps the scores smoothly at +-cap (50) so no logit can dominate; softmax runs in float32.
    Grouped-query heads by broadcasting: q (B, H, T, D) is viewed as (B, KV, H / KV, T, D) against k, v (B, KV, S, D),
    so the shared key/value heads are never copied.
    """
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    q = q.view(B, KV, H // KV, T, D)
    scores = (q @ k[:, :, None].transpose(-2, -1)) * scale  # (B, KV, G, T, D) @ (B, KV, 1, D, S) -> (B, KV, G, T, S)
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None:  # plain causal
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    else:
        mask = mask[:, :, None]  # (B or 1, 1, 1, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v[:, :, None]).view(B, H, T, D)  # (B, KV, G, T, S) @ (B, KV, 1, S, D) -> (B, H, T, D)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) — SwiGLU with silu, GeGLU with gelu (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        if cfg.fused_gate_up:
            self.gate_up_proj = Linear(C, 2 * I, bias=cfg.mlp_bias)  # gate first, then up
        else:
            self.gate_proj = Linear(C, I, bias=cfg.mlp_bias)
            self.up_proj = Linear(C, I, bias=cfg.mlp_bias)
        self.down_proj = Linear(I, C, bias=cfg.mlp_bias)
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh")}[cfg.hidden_act]

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act is F.silu and _wants_grad(gate, up):
            return self.down_proj(swiglu(gate, up))  # same values, saves less for backward (fused_ops.py)
        return self.down_proj(self.act(gate) * up)


def _wants_grad(*tensors) -> bool:
    """Training: a gradient will flow through these tensors (the fused autograd functions pay off only then)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class Block(nn.Module):
    """Pre-norm residual block; Gemma 2/3 also normalise each sub-layer's output ("sandwich" norms)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        eps, plus_one = cfg.rms_norm_eps, cfg.norm_plus_one
        self.sandwich = cfg.sandwich_norm
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, plus_one)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, plus_one)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, plus_one)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, plus_one)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, mask, kv_cache=None):
        if self.sandwich:
            h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_cache))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """The parameter container Hugging Face calls `model`: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)


class Transformer(nn.Module):
    """Embeddings -> blocks -> final norm -> logits; `model.*` and `lm_head` hold the checkpoint's weights."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.final_logit_softcap = config.final_logit_softcap
        self.gradient_checkpointing = False  # recompute each block in backward (saves activation memory)
        # Packed samples (segment_ids) attended per segment (PackedSegments) instead of through a dense mask:
        # None = on CUDA only (where the mask would rule out the flash kernel); True / False force it either way.
        self.per_segment_attention: bool | None = None
        # A tied head's weight packed for oneDNN while generate runs (packed_weights.packed_linears), else None.
        self.packed_head: torch.Tensor | None = None

    def _packed_segments(self, segment_ids, attention_mask, device) -> "PackedSegments | None":
        """The per-segment plan for packed rows when it applies (see per_segment_attention), else None."""
        use = self.per_segment_attention
        use = device.type == "cuda" if use is None else use
        if not use or segment_ids is None or self.config.attn_logit_softcap is not None:
            return None  # Gemma 2's soft-capped scores go through softcapped_attention and its mask
        return PackedSegments(segment_ids) if _packed_segments_ok(segment_ids, attention_mask) else None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, C): the output projection, i.e. the embedding matrix when they are tied."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., C) -> float32 logits (..., V), soft-capped where the family does."""
        if self.config.tie_word_embeddings and getattr(self, "packed_head", None) is not None:
            logits = packed_linear(hidden, self.packed_head, self.model.embed_tokens.weight)
        elif self.config.tie_word_embeddings:
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        logits = logits.float()
        if self.final_logit_softcap is not None:
            logits = self.final_logit_softcap * torch.tanh(logits / self.final_logit_softcap)
        return logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, kv_cache=None,
                return_hidden=False):
        """Logits (B, T, V) float32 for input_ids (B, T), or final-normed hidden states (B, T, C) if return_hidden.

        attention_mask: (B, S) 1 = token, 0 = padding (left or right), S = cached + T tokens.
        position_ids: (B, T); default: count real tokens (from attention_mask), restart per segment, or 0..T-1.
        segment_ids: (B, T) packed samples: a token sees only earlier tokens with the same id.
        kv_cache: a KVCache, extended in place (decoding).
        """
        cfg = self.config
        B, T = input_ids.shape
        past = kv_cache.seq_len if kv_cache is not None else 0
        if segment_ids is not None and past:
            raise ValueError("segment_ids cannot be combined with a non-empty kv_cache")
        if position_ids is None:
            position_ids = default_position_ids(B, T, past, attention_mask, segment_ids, input_ids.device)

        h = self.model.embed_tokens(input_ids)  # (B, T, C)
        if cfg.scale_embeddings:
            # Gemma: * sqrt(C), with the constant rounded to the model dtype first, as in the reference.
            h = h * torch.tensor(cfg.hidden_size**0.5, dtype=h.dtype, device=h.device)

        # One mask and one cos/sin pair per layer type (Gemma 3 uses different rope bases for local/global layers).
        rope, masks = {}, {}
        segments = self._packed_segments(segment_ids, attention_mask, h.device)
        for lt in set(cfg.layer_types):
            rope[lt] = rotation_tables(*layer_rope(cfg.rope[lt], cfg.rotary_dim, position_ids, h.dtype))  # cos, sin
            window = cfg.window(lt)
            first = first_kept_key(past, window) if kv_cache is not None else 0  # older keys left the cache
            if segments is not None and window is None:
                masks[lt] = segments
            else:
                masks[lt] = build_attention_mask(T, past, attention_mask, segment_ids, window, h.device, first)

        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for layer, lt in zip(self.model.layers, cfg.layer_types):
            cos, sin = rope[lt]
            if use_checkpoint:
                h = checkpoint(layer, h, cos, sin, masks[lt], use_reentrant=False)
            else:
                h = layer(h, cos, sin, masks[lt], kv_cache)
        h = self.model.norm(h)
        return h if return_hidden else self.compute_logits(h)


def _packed_segments_ok(segment_ids, attention_mask) -> bool:
    """Per-segment attention equals the masked one when padding is a segment of its own (the collator's rule:
    attention_mask = segment id > 0) or there is no padding mask."""
    return attention_mask is None or bool((attention_mask.bool() == (segment_ids > 0)).all()) \
        or bool(attention_mask.bool().all())


def layer_rope(r: RopeConfig, rotary_dim: int, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin (B, T, rotary_dim) of positions (B, T) under one layer type's RoPE settings (formulas: rope.py).

    LongRoPE chooses its factor list per forward call, as transformers does: long_factor when the call reaches
    past original_max (max(position) + 1 > original_max, over the whole batch), else short_factor. A decoding step
    with a KV cache sees only its own position, so the step that crosses original_max switches to the long factors
    while the cached keys stay rotated with the short ones; generate.py recomputes the cache at that step (as
    transformers' Phi-3 does).
    """
    device = position_ids.device
    if r.rope_type == "yarn":
        inv_freq = yarn_inverse_frequencies(rotary_dim, r.theta, r.factor, r.original_max_position_embeddings,
                                            r.beta_fast, r.beta_slow, r.truncate, device=device)
    elif r.rope_type == "longrope":
        short = longrope_inverse_frequencies(rotary_dim, r.theta, r.short_factor, device)  # (rotary_dim // 2,)
        long = longrope_inverse_frequencies(rotary_dim, r.theta, r.long_factor, device)
        is_long = position_ids.max() + 1 > r.original_max_position_embeddings  # a 0-dim tensor: no GPU sync
        inv_freq = torch.where(is_long, long, short)
    else:
        inv_freq = inverse_frequencies(rotary_dim, r.theta, r.rope_type, r.factor, r.low_freq_factor,
                                       r.high_freq_factor, r.original_max_position_embeddings, device=device)
    return rope_cos_sin(position_ids, inv_freq, dtype, r.attention_factor)


def default_position_ids(B, T, past, attention_mask, segment_ids, device) -> torch.Tensor:
    """Positions (B, T) when the caller gives none.

    With a padding mask, count real tokens so a left-padded row gets the same positions as the unpadded one
    (as transformers' generate does); with segments, restart at 0 for each packed sample.
    """
    if segment_ids is not None:
        idx = torch.arange(T, device=device).expand(B, T)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        segment_start = torch.where(starts, idx, 0).cummax(dim=1).values  # index where each token's segment began
        return idx - segment_start
    if attention_mask is not None:
        positions = attention_mask.long().cumsum(-1) - 1  # (B, S)
        return positions.clamp(min=0)[:, -T:]
    return torch.arange(past, past + T, device=device).expand(B, T)


def build_attention_mask(T, past, attention_mask, segment_ids, sliding_window, device, first_key=0):
    """Boolean (B or 1, 1, T, S) mask, True = may attend; queries are tokens past..past+T-1, keys are tokens
    first_key..past+T-1 (S of them: a sliding layer's cache has dropped the keys before first_key).

    Like transformers, the sliding window counts index distance: a query sees the `sliding_window` newest keys,
    itself included. None means plain causal attention over a fresh sequence (the common training case), or a
    single query without padding: a decoding step, whose keys are exactly what it may see (a sliding layer's cache
    holds only the window's keys), so a mask would only cost time.
    """
    if attention_mask is None and segment_ids is None and (T == 1 or sliding_window is None and past == 0):
        return None
    q_idx = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(first_key, past + T, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx  # causal
    if sliding_window is not None:
        allowed = allowed & (q_idx - k_idx < sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        if attention_mask.shape[-1] != past + T:
            n = attention_mask.shape[-1]
            raise ValueError(f"attention_mask covers {n} tokens, expected {past} cached + {T} new")
        allowed = allowed & attention_mask[:, first_key:].bool()[:, None, None, :]  # padding keys: never attended
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
        allowed = allowed & same[:, None]
    # A padding query may see no key at all; its softmax row would be NaN, and NaN * 0 would then poison real tokens
    # in the next layer. Letting every query see itself keeps all rows finite (padding outputs are ignored anyway).
    return allowed | (k_idx == q_idx)
