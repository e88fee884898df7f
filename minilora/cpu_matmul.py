"""Float32 training matmuls on the CPU through oneDNN instead of MKL.

Why: torch's float32 `torch.mm`/`F.linear` on the CPU call MKL, and MKL runs its fastest kernels on Intel CPUs
only: on the AMD EPYC the benchmarks run on it reaches ~90 GFLOP/s on one core at 2048³. oneDNN (torch's other CPU
library, `torch.ops.mkldnn._linear_pointwise`) JIT-compiles AVX-512 kernels for any x86 CPU, and it takes a plain
(even transposed) weight, reordering it internally per call. Measured, 1 thread, CPU time, median of 7
(SmolLM2-135M's shapes, 1024 rows = a B 4 × T 256 step; benchmarks/gemm_libraries.py measures the forward and
grad_x products on every block shape):

    product                           MKL        oneDNN
    x (1024, 576) @ W (1536, 576)ᵀ    21.0 ms    10.4 ms    forward of gate/up
    g (1024, 1536) @ W (1536, 576)    21.0 ms    10.0 ms    grad_x of the same layer, W.T passed as a view
    gᵀ (1536, 1024) @ x (1024, 576)   19.6 ms    10.2 ms    grad_W (full fine-tuning), both operands views
    h (256, 576) @ E (49152, 576)ᵀ     215 ms     111 ms    one chunk of the vocabulary head

The results differ from MKL's by ~1e-6 relative (the same products summed in another order), as two BLAS
libraries do. No copy of any weight is kept: memory is what MKL's path uses.

Used where a gradient is wanted: `Linear` (every projection of model.py) in training, lora.FrozenLinearLoRA's base
product, grad_x and three of its rank-r products, NF4Linear's training products, and the chunked loss's three
vocabulary products. A forward without gradient (evaluation, `model(ids)` in the logits parity tests) keeps MKL,
the reference's exact kernel; generate has its own oneDNN path with packed weights (packed_weights.py), faster at
1-8 rows.

Not handled: other dtypes and autocast (bf16 products are left to torch), GPUs (the plain torch product). oneDNN's
op returns a new tensor, so an accumulating product (`addmm_`) goes a slice at a time (accumulate_at_b_).
"""

import torch
import torch.nn.functional as F
from torch import nn


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op (torch.ops.mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = onednn_available()


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN computes x·Wᵀ here: both float32 on the CPU, autocast off."""
    return (_ONEDNN and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weightᵀ (K, N) + bias, without autograd: oneDNN where it applies, else F.linear.

    `weight` (N, K) may be a view (pass W.T to multiply by W: g @ W = linear(g, W.T)); no copy is made of it."""
    if uses_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (..., N)
    return F.linear(x, weight, bias)


def accumulate_at_b_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """out (N, K) += aᵀ b for a (M, N), b (M, K): a weight gradient accumulated over chunks (the vocabulary
    head's in full fine-tuning). oneDNN cannot add into `out`, so it goes `rows` rows of out at a time: a 4.7 MB
    temporary at SmolLM2's K 576 instead of one the head's size (113 MB). 256 × 576 × 49152: 104 ms against
    MKL's addmm_ 159 ms (1 thread, CPU time). Else out.addmm_(aᵀ, b)."""
    if not uses_onednn(a, b) or out.dtype != torch.float32:
        return out.addmm_(a.T, b)
    for r in range(0, out.shape[0], rows):
        out[r:r + rows].add_(linear(a[:, r:r + rows].T, b.T))  # (rows, M) @ (M, K)
    return out


class LinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b, with the three products of training through oneDNN:

        y      = x Wᵀ + b            (M, K) @ (K, N)
        grad_x = grad_y W            (M, N) @ (N, K)     = linear(grad_y, Wᵀ)
        grad_W = grad_yᵀ x           (N, M) @ (M, K)     = linear(grad_yᵀ, xᵀ), only when W trains
        grad_b = Σ_rows grad_y

    Saved for backward: x and W, as F.linear's autograd saves them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)  # (..., N)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(grad_y, weight.T)  # (..., N) @ (N, K) -> (..., K)
        g2 = grad_y.reshape(-1, grad_y.shape[-1])  # (M, N)
        if ctx.needs_input_grad[1]:
            grad_w = linear(g2.T, x.reshape(-1, x.shape[-1]).T)  # (N, M) @ (M, K) -> (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)  # (N,)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """An nn.Linear (same parameters, state-dict keys and init) whose training products run through oneDNN.

    With a gradient wanted and float32 CPU tensors, forward is LinearFunction; otherwise (no_grad, bf16,
    autocast, CUDA) it is nn.Linear's own F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and uses_onednn(x, self.weight):
            return LinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
