"""LoRA: freeze the pretrained weight W0 and learn a low-rank update B·A beside it.

Paper: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).
For a frozen linear layer y = x W0ᵀ (+ bias), LoRA adds a trainable rank-r path:

    y = base(x) + (alpha / r) · dropout(x) Aᵀ Bᵀ        A: (r, d_in), B: (d_out, r)

- A starts Kaiming-uniform and B starts at zero, so B·A = 0 and step 0 is exactly the base model (paper §4.1).
- r is the rank of the update and alpha a constant; dividing by r means "tuning alpha is roughly like tuning the
  learning rate" and r can change without retuning (paper §4.1). rsLoRA (Kalajdzievski 2023, arXiv:2312.03732)
  divides by √r instead, which keeps the update's scale stable for large ranks.
- After training, W0 + (alpha/r)·B·A is an ordinary weight: `merge()` folds it in, so inference costs nothing extra.

The parameter names (`base`, `lora_A.weight`, `lora_B.weight`) and the initialisation follow PEFT, so an adapter
saved by minilora loads in PEFT and back (see adapter.py).

`LoRALinear` wraps its base by composition: the base may be an `nn.Linear` or the 4-bit `NF4Linear` (QLoRA); it
only needs `base(x)`, `in_features`, `out_features`, and for merging a float `weight` or a `dequantize()` method.

For training, `FrozenLinearLoRA` computes the same layer as one autograd function (no dropout, no autocast): the
LoRA product is added in place into the base output and backward forms grad_x in one GEMM plus one rank-r update,
where autograd would make an extra pass for each. `forward` picks it when it applies (`_fusable`).

DoRA (a learned magnitude per output row on top of LoRA's direction) is dora.py's DoRALinear, a LoRALinear with
one more parameter.

Deliberately not handled: several adapters per layer, per-module ranks (PEFT's rank_pattern), LoRA on
embeddings or convolutions, a trainable bias.
"""

import itertools
import math
import re
from typing import Sequence

import torch
from torch import nn

from . import cpu_matmul
from .errors import MiniloraError


class LoRALinear(nn.Module):
    """y = base(x) + scale · B(A(dropout(x))), scale = alpha/r (or alpha/√r with rsLoRA); only A and B train."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if r <= 0:
            raise MiniloraError(f"LoRA rank r must be a positive integer, got {r}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A and B live in `dtype` (float32 by default) even when the base is bf16 or 4-bit: the update B·A is small
        # compared with W0 and its optimiser steps are smaller still, so low precision would round them away.
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # PEFT's initialisation, in PEFT's order (so the same seed gives the same A): A as nn.Linear's default
        # (Kaiming-uniform with a=√5, i.e. U(-1/√d_in, 1/√d_in)), B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        if not self.merged and _fusable(self, x):
            return FrozenLinearLoRA.apply(x, self.base, self.lora_A.weight, self.lora_B.weight, self.scale)
        y = self.base(x)  # (..., d_out)
        if self.merged:  # W0 already holds W0 + scale·B·A
            return y
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast the matmuls cast for themselves; casting x to float32 here would only make autocast
            # cast it back (2 conversions of the activation forward, 2 backward, per LoRA linear).
            x = x.to(self.lora_A.weight.dtype)
        xa = self.lora_A(x).flatten(0, -2)  # (N, r), N = all leading dims
        # y + scale · (x Aᵀ) Bᵀ in one addmm: no separate pass for × scale and for + y.
        out = torch.addmm(y.flatten(0, -2).to(xa.dtype), xa, self.lora_B.weight.T, alpha=self.scale)  # (N, d_out)
        return out.view(y.shape).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · B A, shape (d_out, d_in), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale  # (d_out, r) @ (r, d_in)

    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """The weight this layer computes with, W0 + ΔW, in float32 (d_out, d_in)."""
        return w0.float() + self.delta_weight().to(w0.device)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """W0 back from `merged_weight(W0)`."""
        return merged.float() - self.delta_weight().to(merged.device)

    def merge(self) -> None:
        """Fold ΔW into the base weight in place (W0 ← W0 + ΔW); forward then skips the LoRA path."""
        if not self.merged:
            self._set_base(self.merged_weight)
            self.merged = True

    def unmerge(self) -> None:
        """Undo `merge()` (W0 ← W0 − ΔW). In bf16 the round trip is exact only up to bf16 rounding."""
        if self.merged:
            self._set_base(self.unmerged_weight)
            self.merged = False

    def _set_base(self, new_weight) -> None:
        weight = getattr(self.base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise MiniloraError(f"cannot merge in place into a {type(self.base).__name__} (its weight is not a float "
                                "tensor, e.g. 4-bit); use merge_lora(model), which dequantizes first")
        with torch.no_grad():  # computed in float32, rounded once to the base's dtype
            weight.copy_(new_weight(weight).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, merged={self.merged}"


class FrozenLinearLoRA(torch.autograd.Function):
    """y = x W0ᵀ (+ b) + s · (x Aᵀ) Bᵀ with W0 frozen, forward and backward written out (no dropout).

    Autograd would run the base and the LoRA path as separate graphs and add their results: forward copies
    base(x) into the LoRA addmm's output (a pass over (N, d_out)), and backward computes grad_x twice and adds
    the two (a pass over (N, d_in)). Here the LoRA product is accumulated in place into the base output, and

        gB     = s · grad_y B                      (N, r)
        grad_x = grad_y W0 + gB A                  one GEMM, then one rank-r addmm_ into its result
        grad_A = gBᵀ x,   grad_B = s · grad_yᵀ (x Aᵀ)

    The base products (x W0ᵀ and grad_y W0) and three of the rank-r ones go through oneDNN on the CPU in float32
    (cpu_matmul.py: ~2x MKL's rate on the benchmarks' AMD CPU; the in-place addmm_ stay MKL's). Saved for
    backward: x (which the next layers usually hold anyway) and x Aᵀ (N, r); never a dense copy of a 4-bit W0:
    `dense_weight` dequantizes an NF4 base again in backward, as bitsandbytes does.
    """

    @staticmethod
    def forward(ctx, x, base, A, B, scale):
        # x (..., d_in); A (r, d_in); B (d_out, r)
        W = dense_weight(base, x.dtype)  # (d_out, d_in)
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        bias = getattr(base, "bias", None)
        y = cpu_matmul.linear(x2, W, None if bias is None else bias.to(x.dtype))  # (N, d_out), oneDNN on the CPU
        del W  # an NF4 base's dense weight lives only during the matmul
        xa = cpu_matmul.linear(x2, A)  # (N, r)
        y.addmm_(xa, B.T, alpha=scale)  # y += s · (x Aᵀ) Bᵀ, in place
        ctx.save_for_backward(x2, xa, A, B)
        ctx.base, ctx.scale = base, scale
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., d_out)

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, A, B = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (N, d_out)
        gB = cpu_matmul.linear(g, B.T).mul_(ctx.scale)  # (N, d_out) @ (d_out, r) -> (N, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = cpu_matmul.linear(g, dense_weight(ctx.base, g.dtype).T)  # (N, d_out) @ (d_out, d_in)
            grad_x.addmm_(gB, A)  # + (N, r) @ (r, d_in)
            grad_x = grad_x.view(*grad_y.shape[:-1], grad_x.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_A = cpu_matmul.linear(gB.T, x2.T)  # (r, N) @ (N, d_in)
        if ctx.needs_input_grad[3]:
            grad_B = torch.mm(g.T, xa).mul_(ctx.scale)  # (d_out, N) @ (N, r); MKL: oneDNN was 1.1-2.2x slower here
        return grad_x, None, grad_A, grad_B, None


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base's weight as a dense (d_out, d_in) tensor: nn.Linear's own, or an NF4 base dequantized."""
    return base.weight if isinstance(base, nn.Linear) else base.dequantize(dtype)


def _fusable(layer: "LoRALinear", x: torch.Tensor) -> bool:
    """FrozenLinearLoRA computes exactly this layer: a gradient is wanted, no dropout, no autocast, one dtype, and a
    base that is a frozen nn.Linear or an NF4 base on its PyTorch path (on CUDA an NF4 base runs Triton kernels)."""
    base, A = layer.base, layer.lora_A.weight
    # Training only: without a gradient there is no backward to save on, and generate's packed weights
    # (packed_weights.py) run through the base's own forward.
    if not torch.is_grad_enabled() or not isinstance(layer.dropout, nn.Identity) \
            or torch.is_autocast_enabled(x.device.type):
        return False
    if isinstance(base, nn.Linear):
        dtype_ok = base.weight.dtype == A.dtype and not base.weight.requires_grad
    else:
        dtype_ok = getattr(base, "compute_dtype", None) == A.dtype and hasattr(base, "_use_triton") \
            and not base._use_triton(x)
    bias = getattr(base, "bias", None)
    return dtype_ok and x.dtype == A.dtype and (bias is None or not bias.requires_grad)


def _device_of(base: nn.Module) -> torch.device:
    """Where the base's weight lives (NF4Linear's 4-bit weight is neither a parameter nor a buffer)."""
    weight = getattr(base, "weight", None)
    if weight is not None and hasattr(weight, "device"):
        return weight.device
    t = next(itertools.chain(base.parameters(), base.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _is_linear(module: nn.Module) -> bool:
    """A linear layer LoRA can wrap: nn.Linear, or any frozen linear with a dequantize() (NF4Linear)."""
    if isinstance(module, LoRALinear):
        return False
    return isinstance(module, nn.Linear) or (
        hasattr(module, "dequantize") and hasattr(module, "in_features") and hasattr(module, "out_features"))


def linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers LoRA may wrap: every linear except the vocabulary head and LoRA's own A/B."""
    inside_lora = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or any(name.startswith(p + ".") for p in inside_lora):
            continue
        # The vocabulary head (tokens × hidden) is never adapted: it is as large as the embeddings, and PEFT's
        # "all-linear" leaves it out too.
        if name == "lm_head" or name.endswith(".lm_head"):
            continue
        names.append(name)
    return names


def select_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Resolve `targets` to module names with PEFT's rules.

    - "all-linear": every linear in the blocks (`linear_names`);
    - another string: a regular expression that must match the full module name (re.fullmatch);
    - a list: a name matches an entry when it equals it or ends with "." + entry (`q_proj` → `...self_attn.q_proj`).
    """
    available = linear_names(model)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        chosen = available
    elif isinstance(targets, str):
        chosen = [n for n in available if re.fullmatch(targets, n)]
    else:
        chosen = [n for n in available if any(n == t or n.endswith("." + t) for t in targets)]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in available)]
        if chosen and unmatched:
            raise MiniloraError(f"LoRA target(s) {unmatched} match no linear layer; available: "
                                f"{sorted({n.rsplit('.', 1)[-1] for n in available})}")
    if not chosen:
        hint = " (a string is a regular expression for the full name; pass a list for name suffixes)" \
            if isinstance(targets, str) and targets.lower() != "all-linear" else ""
        raise MiniloraError(f"LoRA targets {targets!r} match no linear layer{hint}; available: "
                            f"{sorted({n.rsplit('.', 1)[-1] for n in available})}")
    return chosen


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: str | Sequence[str] = ("q_proj", "v_proj"), use_rslora: bool = False,
               dtype: torch.dtype = torch.float32, layer: type = None) -> list[str]:
    """Freeze `model` and replace each targeted linear by a LoRALinear around it; return the wrapped names.

    layer: the adapter class, LoRALinear by default; dora.DoRALinear for DoRA (it takes the same arguments)."""
    layer = layer or LoRALinear
    names = select_targets(model, targets)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = layer(getattr(parent, child), r, alpha, dropout, use_rslora, dtype)
        # A new module starts in training mode; follow the model's, or dropout would act in an eval()'d model.
        setattr(parent, child, lora.train(model.training))
    return names


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             target_modules: str | Sequence[str] = ("q_proj", "v_proj"), use_rslora: bool = False) -> list[str]:
    """`apply_lora` with PEFT's argument name `target_modules` (the public API)."""
    return apply_lora(model, r, alpha, dropout, target_modules, use_rslora)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its base linear with ΔW merged in; returns the model, now free of LoRA.

    An nn.Linear base is merged in place (no copy of the weights). A 4-bit base becomes an nn.Linear of its compute
    dtype holding dequantize(W) + ΔW, summed in float32 and rounded once: the result is no longer 4-bit.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        if isinstance(module.base, nn.Linear):
            module.merge()
            merged = module.base
        else:
            merged = _merged_dense_linear(module)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merged)
    return model


def _merged_dense_linear(module: "LoRALinear") -> nn.Linear:
    """A dense nn.Linear with weight dequantize(W0) + ΔW for a LoRALinear over a quantized base."""
    base = module.base
    dtype = getattr(base, "compute_dtype", None) or torch.float32
    with torch.no_grad():
        w0 = base.dequantize(torch.float32)  # (d_out, d_in): the 4-bit values are exact in float32
        merged = module.merged_weight(w0) if not module.merged else w0
        weight = merged.to(dtype)  # one rounding, not one for the dequantize and one for the sum
    bias = getattr(base, "bias", None)
    linear = cpu_matmul.Linear(base.in_features, base.out_features, bias=bias is not None, device=weight.device,
                               dtype=dtype)  # the model's own nn.Linear subclass, as before quantizing
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once.

    A 4-bit base (a linear with dequantize()) counts as its d_in·d_out weights, not as its packed integer storage.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters() if p.is_floating_point())
    total += sum(m.in_features * m.out_features for m in model.modules()
                 if _is_linear(m) and not isinstance(m, nn.Linear))
    return trainable, total


def parameter_summary(model: nn.Module) -> str:
    """One line, like PEFT's print_trainable_parameters()."""
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
