"""RMSNorm and SwiGLU for training, as autograd functions that save less than autograd's graph of the same ops.

Autograd records every intermediate an op needs for its own backward. For the two elementwise pieces of a
block that means tensors the backward can rebuild cheaply from what it keeps anyway:

    RMSNorm   y = w · (x · r),  r = 1/√(mean(x²) + eps)
              autograd keeps x, r and the normalised x · r (N, C); here only x and r (N, 1).
              backward, with the gain w frozen (LoRA), in four passes over (N, C):
                  gw = g · w;  grad_x = r · gw − x · (r³ / C) · Σ_c gw · x
              (the gain's own gradient Σ_n g · x · r is computed only when w trains: full fine-tuning).
    SwiGLU    y = silu(gate) · up
              autograd keeps gate, up and silu(gate) (N, I); here gate and up, and backward recomputes
              silu(gate) (one pass over (N, I)): one (N, I) float tensor less per layer until backward.

The forward values are bit-identical to the plain ops (same operations in the same order; x · r · w is computed
as (x · r) · w, the product the reference takes). Gradients agree to float rounding (the sums run in another
order). Used only when a gradient is wanted, for float32 RMSNorm without Gemma's (1 + w) and for silu; every
other case (bf16 norms, GeGLU, inference) runs the plain ops in model.py.
"""

import torch
import torch.nn.functional as F


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        # x (..., C) float32, weight (C,)
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)  # (..., C): w · (x · r), the normalised x never kept

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:  # (C,): Σ over rows of g · x · r
            grad_w = (g * x).mul_(r).reshape(-1, x.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            gw = g * weight  # (..., C)
            dot = torch.linalg.vecdot(gw, x, dim=-1).unsqueeze(-1)  # (..., 1): Σ_c gw · x
            coef = dot.mul_(r.pow(3)).div_(-x.shape[-1])  # (..., 1): −r³/C · Σ_c gw · x
            grad_x = gw.mul_(r).addcmul_(x, coef)  # r · gw − x · r³/C · Σ gw · x, in place
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        # gate, up (..., I)
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # (..., I)

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(g)  # silu(gate) recomputed: (..., I)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(g * up, gate)  # d silu/d gate · g · up, one fused pass
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(gate, up)
