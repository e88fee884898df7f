"""NF4Linear: a frozen linear layer whose weight is stored in 4-bit NF4 (the base layer of QLoRA).

    y = x · dequant(W)ᵀ + b        W: NF4Weight (minilora/nf4.py), b: optional bias in the compute dtype

QLoRA (Dettmers et al., 2023, section 3): the base weights are stored in 4 bits and dequantized to the 16-bit
"computation data type" on the fly; only the LoRA adapters get gradients. So this layer is a fixed function of x:
gradients flow to x (for the adapters of earlier layers), never to W or b. Wrap it in LoRALinear like any
nn.Linear — composition, no special case.

Backends (argument `backend`):
    "triton": the kernels of minilora/kernels/nf4_matmul.py — fused (the dense W is never materialised) below
              its DENSE_MIN_M rows of x, dequantize + cuBLAS from there (faster for long matmuls).
    "torch":  F.linear(x, dequantize_nf4(W)) — the readable reference, for CPUs (in training through oneDNN,
              cpu_matmul.py). The dense W lives only while the matmul runs: backward dequantizes it again for
              grad_x = grad_y · W (as bitsandbytes' MatMul4Bit does), so autograd keeps no 2-bytes-per-weight
              copy of the base between the passes.
    "auto":   "triton" for CUDA tensors, "torch" otherwise.

Like bitsandbytes' Linear4bit, x is cast to the compute dtype and the result back to x's dtype. `state_dict()`
holds the Hugging Face / bitsandbytes keys (`weight`, `weight.absmax`, ..., `weight.quant_state.bitsandbytes__nf4`),
so a model's state dict is a loadable 4-bit checkpoint. `.to(device)` moves the 4-bit weight; `.half()`,
`.to(dtype)` change the bias only (rounding the fp32 scales would change the weight).

Not handled: FP4, training W itself, bias gradients.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import cpu_matmul
from ..errors import MiniloraError
from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4

BACKENDS = ("auto", "triton", "torch")


class DequantizeMatMul(torch.autograd.Function):
    """y = x · dequant(W)ᵀ + b in x's dtype, differentiable w.r.t. x; saves the 4-bit W, not the dense one.

    Plain F.linear(x, dequantize_nf4(W), b) would make autograd save the dense W for backward: every base layer
    of the model would hold a 16-bit copy from the forward to the backward pass, undoing QLoRA's memory saving.
    Dequantizing a second time in backward costs one more pass over the 4-bit codes instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.q = q  # the frozen weight object itself, not a copy
        # oneDNN for float32 on the CPU (cpu_matmul.py: ~2x MKL's rate), else F.linear; bias fused, as in bnb
        return cpu_matmul.linear(x, dequantize_nf4(q, x.dtype), bias)  # (..., N)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = cpu_matmul.linear(grad_y, dequantize_nf4(ctx.q, grad_y.dtype).T)  # (..., N) @ (N, K) → (..., K)
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None  # (N,)
        return grad_x, None, grad_bias


class NF4Linear(nn.Module):
    def __init__(
        self,
        weight: NF4Weight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if len(weight.shape) != 2:
            raise MiniloraError(f"NF4Linear needs a 2-D weight (out_features, in_features), got {tuple(weight.shape)}")
        if backend not in BACKENDS:
            raise MiniloraError(f"NF4Linear backend must be one of {BACKENDS}, got {backend!r}")
        self.weight = weight  # frozen; not an nn.Parameter (see _apply and _save_to_state_dict)
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype or weight.dtype
        self.backend = backend
        if bias is not None:  # a frozen parameter, so model.parameters() lists it and it moves with .to()
            bias = nn.Parameter(bias.detach().to(self.compute_dtype), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> "NF4Linear":
        """Quantize an nn.Linear's weight to NF4 (on the weight's device); the bias is kept in the compute dtype."""
        weight = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(weight, linear.bias, compute_dtype or linear.weight.dtype, backend)

    @property
    def nf4(self) -> NF4Weight:
        """The 4-bit weight; under FSDP2 `weight` is an NF4Tensor parameter (quant/nf4_tensor.py) wrapping it."""
        return self.weight if isinstance(self.weight, NF4Weight) else self.weight.nf4_weight()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out_features, in_features), in `dtype` (default: the compute dtype)."""
        return dequantize_nf4(self.nf4, dtype or self.compute_dtype)

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise MiniloraError("NF4Linear backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1); use 'auto'")
        return self.backend == "triton" or (self.backend == "auto" and x.is_cuda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x.to(self.compute_dtype)  # (..., in_features)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if self._use_triton(x):
            from minilora.kernels.nf4_matmul import nf4_matmul  # imports triton only when it is used

            y = nf4_matmul(x_c, self.nf4, bias)
        elif torch.is_grad_enabled():
            y = DequantizeMatMul.apply(x_c, self.nf4, bias)
        else:  # evaluation: nothing to save for backward; F.linear, the reference's kernel
            y = F.linear(x_c, dequantize_nf4(self.nf4, x_c.dtype), bias)
        return y.to(x.dtype)  # (..., out_features)

    def extra_repr(self) -> str:
        q = self.weight if isinstance(self.weight, NF4Weight) else self.weight.template
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={q.blocksize}, double_quant={q.double_quant}, compute_dtype={self.compute_dtype}, "
            f"backend={self.backend}, bits_per_parameter={q.bits_per_parameter:.3f}"
        )

    # --- moving and saving -------------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Module.to / .cuda / .half call _apply with a tensor conversion. The 4-bit weight follows the device only:
        # probe `fn` with an empty fp32 tensor to learn the target device, and keep every dtype of the format.
        if not isinstance(self.weight, NF4Weight):  # an NF4Tensor parameter (FSDP2) moves like any parameter
            return super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.weight.device)).device
        if device != self.weight.device:
            self.weight = self.weight.to(device)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        for key, t in self.weight.to_hf_state(prefix.rstrip(".")).items():
            destination[key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if mine:
            q = NF4Weight.from_hf_state(mine, prefix.rstrip("."))
            if tuple(q.shape) != (self.out_features, self.in_features):
                errors.append(f"{prefix}weight: shape {tuple(q.shape)} != {(self.out_features, self.in_features)}")
                return
            self.weight = q.to(self.weight.device)
        elif strict:
            missing_keys.append(prefix + "weight")
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + "weight")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
