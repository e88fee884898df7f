"""oneDNN-packed copies of a model's linear weights, for generating on the CPU in float32.

Why: torch's float32 `F.linear` on the CPU calls MKL, and MKL's kernels are far from this machine's limits on
the AMD EPYC the benchmarks run on (MKL picks its fastest code paths for Intel CPUs only). oneDNN (torch's other
CPU library, `torch.ops.mkldnn`) has JIT kernels for every x86 CPU; given a weight reordered once into its blocked
layout (`_reorder_linear_weight`) it multiplies much faster. Measured on SmolLM2-135M's 210 block linears
(1 thread, interleaved, CPU time; benchmarks/results/generate_vs_hf_cpu_*.md has the whole-model figures):

    rows M     MKL F.linear   oneDNN packed
    1          48.4 ms        33.3 ms     (8.8 -> 12.7 GB/s of weights: a decoding step at batch 1)
    8          79.7 ms        42.4 ms     (decoding at batch 8)
    128        416 ms         196 ms      (a 128-token prefill: 70 -> 150 GFLOP/s)

A layout packed for 128 rows was the fastest at 1 and 8 rows too, so one copy serves prefill and decoding.

Costs: packing is a second copy of every weight (513 MB for SmolLM2-135M in float32; skipped when that copy would
not fit in half the available memory, copies_fit_in_memory), and it takes 0.13 s on a
quiet core (0.5-0.9 s under load: mostly first touches of the fresh pages), which would be most of a short reply's
time if every call packed again. So the copies are kept between calls, in a cache with weak keys (an entry dies
with its layer), each tagged with its weight's version (storage, shape, torch's in-place counter): a weight changed
since (an optimizer step, `merge`, load_state_dict) is packed again at the next call, never used stale; a LoRA
adapter attached since adds layers that are packed on first use. `release_packed(model)` hands the memory back.
`generate` opens `packed_linears(model)`; inside it every `nn.Linear` of the model runs through its packed weight,
a tied vocabulary head through a packed copy of the embedding (Transformer.packed_head); on leaving, the modules
are as they were. Products that read the same input are stacked into one packed matrix and made once:
- q, k, v and gate, up, through the fused path the model already has for checkpoints stored that way (Phi-3's
  qkv_proj, gate_up_proj): 120 products per SmolLM2 token instead of 210;
- a LoRA layer's base weight and its A (the B product is then one addmm, as in LoRALinear.forward); DoRA layers
  and LoRA-wrapped q/k/v keep one product per linear.

Numerics: the same float32 products summed in another order. SmolLM2-135M's logits move by ~1e-4 (out of ~20)
from MKL's, as they would between two BLAS libraries; greedy tokens stay those of transformers
(tests/test_generate.py, tests/test_real_model.py). A plain forward (`model(ids)`) keeps MKL, so the logits
parity tests see the reference's exact kernel.

Not handled: other dtypes (bf16/fp16 keep F.linear: their rounding is the reference's business), autograd (the
packed op has no backward: only used under no_grad), GPUs (a no-op there), NF4 layers (not nn.Linear).
"""

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_matmul
from .lora import LoRALinear

PACK_ROWS = 128  # the row count oneDNN chooses its blocked layout for (fastest from 1 to 128 rows, see above)


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear (cpu_matmul.py) and its weight packing."""
    return cpu_matmul.onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def packing_available(model) -> bool:
    """True when packing applies: float32 weights on the CPU, oneDNN present, no gradient wanted, and room in
    memory for the packed copies."""
    w = next(model.parameters(), None)
    return (w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and onednn_available()
            and not torch.is_grad_enabled() and copies_fit_in_memory(model))


def copies_fit_in_memory(model) -> bool:
    """Whether a packed copy of the model's float32 weights fits in half the memory the system has available now
    (Linux's MemAvailable; elsewhere assumed). The copy is the size of the weights: 0.5 GB for SmolLM2-135M, but
    28 GB for a 7B model in float32, where packing would invite the out-of-memory killer. Without room, generate
    multiplies the weights as they are (F.linear), slower but without a second copy. Copies already packed by an
    earlier call are held already: only the rest must fit."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype == torch.float32)
    available = available_memory_bytes()
    return available is None or weight_bytes - packed_bytes(model) <= available // 2


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError):
        return None
    return None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A (N, K) float32 weight in oneDNN's blocked layout (an opaque mkldnn tensor, a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)


def packing_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a packed product may stand in for x·Wᵀ: no gradient wanted (it has no backward), float32 on the
    CPU, autocast off."""
    return not torch.is_grad_enabled() and cpu_matmul.uses_onednn(x, weight)


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias=None) -> torch.Tensor:
    """x (..., K) @ Wᵀ + b through a packed (N, K) weight: (..., N)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x (..., K) @ Wᵀ + b through the packed copy of `weight`; F.linear where packing does not apply
    (autocast on, another dtype, or a gradient wanted)."""
    return packed_product(x, packed, bias) if packing_applies(x, weight) else F.linear(x, weight, bias)


# The packed copy of each weight, kept between calls: {nn.Linear or Transformer: (version, packed)}. Weak keys, so
# an entry dies with its module; `version` (weight_version) decides whether the copy still holds the weight.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def weight_version(weight: torch.Tensor) -> tuple:
    """What changes when the weight's values may have: its storage (a new tensor or .data assigned), its shape,
    and torch's in-place counter (an optimizer step, merge's add_, load_state_dict's copy_ all bump it)."""
    return (weight.data_ptr(), tuple(weight.shape), weight._version)


def cached_pack(owner: nn.Module, *weights: torch.Tensor) -> torch.Tensor:
    """The packed copy of one weight (owned by `owner`), or of several stacked by rows (N1 + N2 + ..., K), packed
    again only if a weight changed since."""
    version = tuple(weight_version(w) for w in weights)
    hit = _CACHE.get(owner)
    if hit is None or hit[0] != version:
        stacked = weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        _CACHE[owner] = hit = (version, pack(stacked))
    return hit[1]


def release_packed(model) -> None:
    """Drop the packed copies of `model`'s weights (the memory comes back; the next generate packs again)."""
    for m in model.modules():
        _CACHE.pop(m, None)


def packed_bytes(model) -> int:
    """Bytes held by the packed copies of `model`'s weights (about its float32 weights once packed)."""
    return sum(torch.ops.mkldnn._nbytes(_CACHE[m][1]) for m in model.modules() if m in _CACHE)


class _PackedForward:
    """Stands in for one nn.Linear's forward while the context is open."""

    def __init__(self, linear: nn.Linear):
        self.linear, self.packed = linear, cached_pack(linear, linear.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.linear.weight, self.linear.bias)


class _PackedStack:
    """Stands in for a fused projection (Attention.qkv_proj, MLP.gate_up_proj) while the context is open: the
    linears that read the same input, their weights stacked in one packed matrix. One product instead of two or
    three: at batch 1 each call's fixed cost is a large part of a small product (a k_proj is 0.4 MB), measured
    ~2 ms of a ~34 ms SmolLM2 token."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self.packed = cached_pack(linears[0], *(m.weight for m in linears))  # cached under its first part
        biases = [m.bias for m in linears]
        self.bias = None if biases[0] is None else torch.cat(biases)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not packing_applies(x, self.linears[0].weight):
            return torch.cat([m(x) for m in self.linears], dim=-1)
        return packed_product(x, self.packed, self.bias)  # (..., N1 + N2 + ...)


class _PackedLoRA:
    """Stands in for an unmerged LoRALinear's forward while the context is open: its base weight and A stacked
    ((d_out + r, d_in), packed once), so one product gives both base(x) and x Aᵀ; then y + scale · (x Aᵀ) Bᵀ in one
    addmm, as LoRALinear.forward computes it. At batch 1 the separate A product, its module call and the casts
    were ~85 us per layer, 210 layers in a SmolLM2 adapter. Anything else (a gradient, merged, dropout active,
    another dtype) runs the layer's own forward."""

    def __init__(self, layer: LoRALinear):
        self.layer = layer
        self.packed = cached_pack(layer.base, layer.base.weight, layer.lora_A.weight)  # cached under the base
        bias = layer.base.bias
        self.bias = None if bias is None else torch.cat((bias.detach(), bias.new_zeros(layer.r)))  # A has none

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        dropout_on = layer.dropout.training and not isinstance(layer.dropout, nn.Identity)
        if layer.merged or dropout_on or not packing_applies(x, layer.base.weight):
            return type(layer).forward(layer, x)
        both = packed_product(x, self.packed, self.bias)  # (..., d_out + r)
        y, xa = both.flatten(0, -2).split([layer.out_features, layer.r], dim=-1)  # (N, d_out), (N, r)
        out = torch.addmm(y, xa, layer.lora_B.weight.T, alpha=layer.scale)  # (N, d_out)
        return out.view(*x.shape[:-1], layer.out_features)


def packable_lora(module: nn.Module, packable: set) -> bool:
    """A plain LoRALinear (not DoRA, whose forward differs) over a packable float32 base, with a float32 A, and not
    already stood in for (by an enclosing packed_linears, which restores it)."""
    return (type(module) is LoRALinear and module.base in packable and module.lora_A.weight.dtype == torch.float32
            and "forward" not in vars(module))


# Linears that read the same input, and the fused name the model's forward already takes for checkpoints that
# store them stacked (Phi-3): {fused name: the parts, in the stacked order}.
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def stackable_parts(module: nn.Module, packable: set) -> dict[str, list[nn.Linear]]:
    """{fused name: its parts} for the groups of `module` that can be stacked: every part a packable plain linear
    (a LoRA-wrapped one is not: its adapter must see the input), with a bias on all of them or none."""
    groups = {}
    for fused, names in STACKED.items():
        parts = [getattr(module, n, None) for n in names]
        if hasattr(module, fused) or not all(p in packable for p in parts):
            continue
        if len({p.bias is None for p in parts}) == 1:
            groups[fused] = parts
    return groups


@contextmanager
def packed_linears(model):
    """Within the block, every nn.Linear of `model` (and a tied head) multiplies through a packed copy of its
    weight (kept for the next call while the weight is unchanged); a no-op where packing_available(model) is
    False. Do not change weights inside the block."""
    if not packing_available(model):
        yield model
        return
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32
               and m.weight.device.type == "cpu" and "forward" not in vars(m)]
    packable = set(linears)
    loras = [m for m in model.modules() if packable_lora(m, packable)]
    stacks = {owner: stackable_parts(owner, packable) for owner in model.modules()}
    stacks = {owner: groups for owner, groups in stacks.items() if groups}
    stacked = {id(p) for groups in stacks.values() for parts in groups.values() for p in parts}
    stacked |= {id(p) for m in loras for p in (m.base, m.lora_A, m.lora_B)}  # B: multiplied as it is, by addmm
    linears = [m for m in linears if id(m) not in stacked]  # packed once, in their stack
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    try:
        for m in linears:
            m.forward = _PackedForward(m)  # an instance attribute: nn.Module.__call__ finds it before the class's
        for m in loras:
            m.forward = _PackedLoRA(m)
        for owner, groups in stacks.items():
            for fused, parts in groups.items():
                setattr(owner, fused, _PackedStack(parts))  # not a module: no parameter, no state_dict key
        if tied:
            model.packed_head = cached_pack(model, model.model.embed_tokens.weight)  # (V, C), for compute_logits
        yield model
    finally:
        for m in linears + loras:
            vars(m).pop("forward", None)
        for owner, groups in stacks.items():
            for fused in groups:
                vars(owner).pop(fused, None)
        if tied:
            model.packed_head = None
