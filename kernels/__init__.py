"""Triton kernels for minilora (installed as minilora.kernels).

- nf4_dequant: NF4 (bitsandbytes layout, double quantization) → dense weight.
- nf4_matmul:  y = x · dequant(W)ᵀ (GEMV for decoding, tiled GEMM for training) and grad_x without writing the
               dense weight, or dequantize + cuBLAS from DENSE_MIN_M rows on; `nf4_matmul(x, q, bias)` is the
               differentiable entry point.

Each file: docstring with the algorithm → PyTorch reference → @triton.jit kernels → launchers → autograd →
public function.
"""
