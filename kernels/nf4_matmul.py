"""Triton kernels: y = x · dequant(W)ᵀ and its input gradient for a frozen NF4 weight, dequantizing in registers.

W is (N, K) = (out_features, in_features), stored as bitsandbytes NF4 (see minilora/nf4.py); x is (M, K).
The dense W is never written to memory: each kernel reads 4-bit codes and rebuilds a tile of W right before it
is multiplied, so the weight costs 0.5 byte (+ 1/64 byte of scales) per element of memory traffic instead of 2.

The tile that all three kernels share — one "chunk" of 64 consecutive weights in each of BLOCK_N rows of W:

    bytes  = packed[n * K/2 + k0/2 : + 32]          # row n starts at byte n*K/2 because K is even
    hi, lo = bytes >> 4, bytes & 0xF                # hi = W[n, k0 + 2j], lo = W[n, k0 + 2j + 1], j = 0..31
    scale  = absmax[(n*K + k0) // blocksize]        # two-level decode of one scale per row: K % 64 == 0 and 64
                                                    # divides the blocksize, so a chunk never crosses a quant
                                                    # block (blocks may still straddle rows)
    W[n, k0 + 2j] = quant_map[hi] * scale,  W[n, k0 + 2j + 1] = quant_map[lo] * scale

Instead of interleaving hi and lo back into k order, x is split the same way (x_even = x[:, k0 + 2j],
x_odd = x[:, k0 + 2j + 1]):   x · W[n]ᵀ over the chunk = x_even · hiᵀ + x_odd · loᵀ.

Kernels
    GEMV  (decode, M <= 4):   for each x row m and BLOCK_N rows of W: acc[n, j] += hi*x_even + lo*x_odd over
                              the chunks of a K-slice (split-K: several programs per row when N is small);
                              y = Σ_j acc, Σ over slices. Memory-bound: the goal is 0.516 byte per weight.
    GEMM  (training, M > 4):  tile (BLOCK_M, BLOCK_N) of y, loop over chunks:
                              acc += dot(x_even, hiᵀ) + dot(x_odd, loᵀ)  (tensor cores, fp32 accumulator)
    GRAD  (backward):         grad_x = grad_y · W, tile (BLOCK_M, 64 columns of x), loop over n:
                              g_even += dot(grad_y, hi); g_odd += dot(grad_y, lo)
Every dequantized tile is rounded to the activation dtype before it is multiplied, like the reference
F.linear(x, dequantize_nf4(q, x.dtype)), so the kernels differ from it in the order of the fp32 sums only (on a GPU
the compiler may also fuse the scale's multiply-add into an FMA: at most 1 fp32 ulp before that rounding; the
dequantize kernel turns fusion off to stay bit-identical, these keep it for speed).

With blocksize 32 the chunk is 32 weights (16 bytes). Not handled: in_features not a multiple of the chunk falls
back to the Triton dequantize + a torch matmul, as bitsandbytes does (real models never hit it); no grad wrt W: the
4-bit weight is frozen (QLoRA trains adapters only).
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from minilora.kernels.nf4_dequant import _check_weight, _or_dummy, triton_dequantize
from minilora.quant.nf4 import NF4Weight, dequantize_nf4

# --- reference (PyTorch) -----------------------------------------------------------------------------------------


def reference_nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · dequant(W)ᵀ + bias, the dense weight in x's dtype. Autograd gives grad_x = grad_y · dequant(W)."""
    return F.linear(x, dequantize_nf4(q, x.dtype), bias)


# --- kernels -----------------------------------------------------------------------------------------------------


@triton.jit
def _dequant_chunk(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, quant_map_ptr, offset,
    rows, row_mask,  # (BLOCK_N,) row indices n of W and which of them exist
    k0, K,  # the chunk covers columns k0 .. k0 + 2*HALF of W
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """(hi, lo): fp32 tiles (BLOCK_N, HALF) holding W[rows, k0 + 2j] and W[rows, k0 + 2j + 1]."""
    j = tl.arange(0, HALF)
    # --- nibble unpack: the chunk is HALF consecutive bytes of each row (K is even, so rows start on a byte).
    byte_idx = rows[:, None] * (K // 2) + (k0 // 2 + j)[None, :]  # (BLOCK_N, HALF)
    byte = tl.load(packed_ptr + byte_idx, mask=row_mask[:, None], other=0).to(tl.int32)
    # --- code lookup: gathers from the 16-entry NF4 table (64 bytes, always in L1).
    hi = tl.load(quant_map_ptr + (byte >> 4))  # even columns: the first element sits in the high nibble
    lo = tl.load(quant_map_ptr + (byte & 0xF))  # odd columns
    # --- two-level absmax, one per row: the chunk never crosses a quant block (K % 2*HALF == 0, 2*HALF | QBLOCK).
    b = (rows * K + k0) // QBLOCK  # (BLOCK_N,) quant block of W[n, k0]
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + b, mask=row_mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + b // 256, mask=row_mask, other=0.0)
        scale = tl.load(nested_map_ptr + code8) * nested + offset  # same fp32 ops as the reference
    else:
        scale = tl.load(absmax_ptr + b, mask=row_mask, other=0.0)
    scale = tl.where(row_mask, scale, 0.0)  # rows past N contribute exact zeros
    return hi * scale[:, None], lo * scale[:, None]


@triton.jit
def _nf4_gemv_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, quant_map_ptr,
    partial_ptr,  # (SPLIT_K, M, N): one partial sum of y per K-slice (fp32), or y itself when SPLIT_K == 1
    # scalars
    offset, M, N, K, k_per_split,  # k_per_split: columns per K-slice, a multiple of 2*HALF
    stride_xm,
    # meta-parameters
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) rows of W = columns of y
    row_mask = rows < N
    j = tl.arange(0, HALF)
    x_row = x_ptr + m * stride_xm

    # A 2-D accumulator: the cross-lane sum over j happens once at the end, not once per chunk.
    acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, 2 * HALF):
        x_even = tl.load(x_row + k0 + 2 * j)  # (HALF,) x[m, k0 + 2j]
        x_odd = tl.load(x_row + k0 + 2 * j + 1)
        hi, lo = _dequant_chunk(
            packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, quant_map_ptr, offset,
            rows, row_mask, k0, K, QBLOCK, DOUBLE_QUANT, HALF,
        )  # fmt: skip
        # Round W to x's dtype first (as the reference's dense weight is), then multiply-add in fp32.
        hi = hi.to(x_ptr.dtype.element_ty).to(tl.float32)
        lo = lo.to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += hi * x_even.to(tl.float32)[None, :] + lo * x_odd.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    tl.store(partial_ptr + (pid_k * M + m) * N + rows, y.to(partial_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _nf4_gemm_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, quant_map_ptr, y_ptr,
    # scalars
    offset, M, N, K,
    stride_xm, stride_ym,
    # meta-parameters
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) rows of W = columns of y
    m_mask, n_mask = rows_m < M, rows_n < N
    j = tl.arange(0, HALF)
    x_rows = x_ptr + rows_m[:, None] * stride_xm  # (BLOCK_M, 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, 2 * HALF):
        x_even = tl.load(x_rows + (k0 + 2 * j)[None, :], mask=m_mask[:, None], other=0.0)  # (BLOCK_M, HALF)
        x_odd = tl.load(x_rows + (k0 + 2 * j + 1)[None, :], mask=m_mask[:, None], other=0.0)
        hi, lo = _dequant_chunk(
            packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, quant_map_ptr, offset,
            rows_n, n_mask, k0, K, QBLOCK, DOUBLE_QUANT, HALF,
        )  # fmt: skip  (BLOCK_N, HALF) each
        hi = tl.trans(hi.to(x_ptr.dtype.element_ty))  # (HALF, BLOCK_N), in x's dtype for the tensor cores
        lo = tl.trans(lo.to(x_ptr.dtype.element_ty))
        # "ieee": fp32 activations get a true fp32 product (like torch's default), not tf32; 16-bit ignore it.
        acc = tl.dot(x_even, hi, acc, input_precision="ieee")
        acc = tl.dot(x_odd, lo, acc, input_precision="ieee")
    y_ptrs = y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _nf4_grad_input_kernel(
    # pointers
    gy_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, quant_map_ptr, gx_ptr,
    # scalars
    offset, M, N, K,
    stride_gym, stride_gxm,
    # meta-parameters
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    k0 = pid_k * 2 * HALF  # this program owns columns k0 .. k0 + 2*HALF of grad_x (one chunk of W's rows)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    m_mask = rows_m < M
    j = tl.arange(0, HALF)

    g_even = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)  # grad_x[:, k0 + 2j]
    g_odd = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)  # grad_x[:, k0 + 2j + 1]
    for n0 in range(0, N, BLOCK_N):  # the reduction runs over W's rows
        rows_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = rows_n < N
        gy = tl.load(
            gy_ptr + rows_m[:, None] * stride_gym + rows_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0
        )  # (BLOCK_M, BLOCK_N)
        hi, lo = _dequant_chunk(
            packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, quant_map_ptr, offset,
            rows_n, n_mask, k0, K, QBLOCK, DOUBLE_QUANT, HALF,
        )  # fmt: skip  (BLOCK_N, HALF) each
        g_even = tl.dot(gy, hi.to(gy_ptr.dtype.element_ty), g_even, input_precision="ieee")
        g_odd = tl.dot(gy, lo.to(gy_ptr.dtype.element_ty), g_odd, input_precision="ieee")
    gx_rows = gx_ptr + rows_m[:, None] * stride_gxm
    tl.store(gx_rows + (k0 + 2 * j)[None, :], g_even.to(gx_ptr.dtype.element_ty), mask=m_mask[:, None])
    tl.store(gx_rows + (k0 + 2 * j + 1)[None, :], g_odd.to(gx_ptr.dtype.element_ty), mask=m_mask[:, None])


# --- launchers ---------------------------------------------------------------------------------------------------

GEMV_MAX_M = 4  # up to 4 rows of x: one GEMV pass per row (bnb also switches kernels at M = 4); unmeasured here
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tile sizes: untimed guesses for an H100 (the session that wrote this had no GPU). Compiled offline for sm_90
# (bf16) they use 94 (GEMV, 4 warps), 192 (GEMM, 8 warps) and 124 (GRAD, 8 warps) registers per thread, no spills;
# the GEMM with 4 warps would need 255. benchmarks/bench_nf4_kernels.py is the place to retune them.
# The interpreter runs one program at a time: there the smallest tile tl.dot accepts (16) keeps CPU tests fast.
GEMV_BLOCK_N = 64  # 64 rows x 32 bytes = 2 KB of codes per loop iteration; 16 bytes per thread with 4 warps
GEMM_BLOCK = (16, 16) if INTERPRET else (64, 128)  # (BLOCK_M, BLOCK_N)
GRAD_BLOCK = (16, 16) if INTERPRET else (64, 64)

# Pipeline stages: Triton keeps num_stages tiles of x and of the codes in flight in shared memory, which the GPU
# bounds per program. Compiled offline (tests/test_kernels.py), the GEMM tile at 3 stages needs 92 KB in bf16 but
# 130 KB in fp32: more than the 99 KB of an RTX 3090/4090, A10 or L4 (A100: 163 KB, H100: 227 KB; a T4 does not
# pipeline and needs 48 KB). So a launch that does not fit is retried with one stage fewer, and the depth that
# loaded is remembered per kernel, dtype and device.
_stages_that_fit: dict[tuple, int] = {}


def _launch(kernel, grid, args: tuple, meta: dict, num_warps: int, num_stages: int) -> None:
    """kernel[grid](*args, **meta) with num_stages pipeline stages, or fewer when this GPU's shared memory is short."""
    key = (kernel.__name__, args[0].dtype, args[0].device)  # args[0]: the activations
    stages = _stages_that_fit.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, **meta, num_warps=num_warps, num_stages=stages)
        except OutOfResources:  # raised when the compiled kernel is loaded, before it runs: nothing was written
            if stages == 1:
                raise
            stages -= 1
            continue
        _stages_that_fit[key] = stages
        return


def _chunk_half(q: NF4Weight) -> int:
    """Half the chunk width: chunks are 64 weights (or the whole quant block when it is 32), stored in HALF bytes."""
    return min(64, q.blocksize) // 2


def _fused_ok(q: NF4Weight) -> bool:
    return q.shape[1] % (2 * _chunk_half(q)) == 0


def _common_args(q: NF4Weight) -> tuple:
    return (q.packed, q.absmax, _or_dummy(q.nested_absmax, q), _or_dummy(q.nested_quant_map, q), q.quant_map)


def _check_inputs(t: torch.Tensor, q: NF4Weight, last_dim: int, what: str) -> None:
    if len(q.shape) != 2:
        raise ValueError(f"nf4_matmul needs a 2-D weight (out_features, in_features), got shape {tuple(q.shape)}")
    if t.shape[-1] != last_dim:
        raise ValueError(f"{what} has last dimension {t.shape[-1]}, expected {last_dim} for weight {tuple(q.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{what} dtype {t.dtype} is not float32/float16/bfloat16")
    if t.device != q.device:
        raise ValueError(f"{what} is on {t.device} but the NF4 weight is on {q.device}")
    if t.numel() >= 2**31 or t.numel() // last_dim * max(q.shape) >= 2**31:
        raise ValueError(f"{what} with {t.numel()} elements is too large for the kernels' int32 indexing")
    _check_weight(q)


def _split_k(n_programs: int, k_chunks: int, device: torch.device) -> int:
    """Slices of K per row so that a GEMV launches ~4 programs per SM (a small N alone cannot fill the GPU)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(k_chunks // 4, triton.cdiv(4 * sms, n_programs)))


def nf4_gemv(x2: torch.Tensor, q: NF4Weight, split_k: int | None = None) -> torch.Tensor:
    """y = x2 · Wᵀ for a few rows, (M, K) → (M, N), with the GEMV kernel (K must be a multiple of the chunk)."""
    (M, K), N, half = x2.shape, q.shape[0], _chunk_half(q)
    k_chunks = K // (2 * half)
    n_blocks = triton.cdiv(N, GEMV_BLOCK_N)
    split_k = split_k or _split_k(n_blocks * M, k_chunks, x2.device)
    k_per_split = triton.cdiv(k_chunks, split_k) * 2 * half
    split_k = triton.cdiv(K, k_per_split)  # no empty slices
    # One slice: the kernel stores y itself (cast on store). Several: fp32 partial sums, added here in a fixed
    # order (deterministic, unlike atomic adds across programs).
    partial = torch.empty((split_k, M, N), dtype=torch.float32 if split_k > 1 else x2.dtype, device=x2.device)
    _nf4_gemv_kernel[(n_blocks, M, split_k)](
        x2, *_common_args(q), partial,
        q.offset, M, N, K, k_per_split, x2.stride(0),
        QBLOCK=q.blocksize, DOUBLE_QUANT=q.double_quant, HALF=half, BLOCK_N=GEMV_BLOCK_N,
        num_warps=4, num_stages=4,
    )  # fmt: skip
    return partial[0] if split_k == 1 else partial.sum(dim=0).to(x2.dtype)  # (M, N)


def nf4_gemm(x2: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """y = x2 · Wᵀ, (M, K) → (M, N), with the tiled GEMM kernel (K must be a multiple of the chunk)."""
    (M, K), N = x2.shape, q.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    block_m, block_n = GEMM_BLOCK
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    args = (x2, *_common_args(q), y, q.offset, M, N, K, x2.stride(0), y.stride(0))
    meta = dict(QBLOCK=q.blocksize, DOUBLE_QUANT=q.double_quant, HALF=_chunk_half(q), BLOCK_M=block_m, BLOCK_N=block_n)
    _launch(_nf4_gemm_kernel, grid, args, meta, num_warps=8, num_stages=3)
    return y


def nf4_grad_input(gy2: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """grad_x = gy2 · W, (M, N) → (M, K), with the fused backward kernel (K must be a multiple of the chunk)."""
    (M, N), K, half = gy2.shape, q.shape[1], _chunk_half(q)
    gx = torch.empty((M, K), dtype=gy2.dtype, device=gy2.device)
    block_m, block_n = GRAD_BLOCK
    grid = (triton.cdiv(M, block_m), K // (2 * half))
    args = (gy2, *_common_args(q), gx, q.offset, M, N, K, gy2.stride(0), gx.stride(0))
    meta = dict(QBLOCK=q.blocksize, DOUBLE_QUANT=q.double_quant, HALF=half, BLOCK_M=block_m, BLOCK_N=block_n)
    _launch(_nf4_grad_input_kernel, grid, args, meta, num_warps=8, num_stages=3)
    return gx


def nf4_linear_forward(x: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """y = x · dequant(W)ᵀ for x of shape (..., K): picks GEMV, GEMM or (unaligned K) dequantize + matmul."""
    N, K = q.shape
    _check_inputs(x, q, K, "x")
    x2 = x.reshape(-1, K)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], N))
    if not _fused_ok(q):
        y = x2 @ triton_dequantize(q, x.dtype).t()
    elif x2.shape[0] <= GEMV_MAX_M:
        y = nf4_gemv(x2, q)
    else:
        y = nf4_gemm(x2, q)
    return y.view(*x.shape[:-1], N)


def nf4_linear_backward(grad_y: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """grad_x = grad_y · dequant(W) for grad_y of shape (..., N)."""
    N, K = q.shape
    _check_inputs(grad_y, q, N, "grad_y")
    gy2 = grad_y.reshape(-1, N)  # (M, N)
    if gy2.stride(-1) != 1:
        gy2 = gy2.contiguous()
    if gy2.shape[0] == 0:
        return grad_y.new_zeros((*grad_y.shape[:-1], K))
    gx = nf4_grad_input(gy2, q) if _fused_ok(q) else gy2 @ triton_dequantize(q, grad_y.dtype)
    return gx.view(*grad_y.shape[:-1], K)


# --- autograd ----------------------------------------------------------------------------------------------------


class NF4MatMul(torch.autograd.Function):
    """y = x · dequant(W)ᵀ; backward returns grad_x only (W is frozen). Saves no activations: W is re-read."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: NF4Weight) -> torch.Tensor:
        ctx.q = q  # the frozen weight itself, not a copy
        return nf4_linear_forward(x, q)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = nf4_linear_backward(grad_y, ctx.q) if ctx.needs_input_grad[0] else None
        return grad_x, None


# --- public function ---------------------------------------------------------------------------------------------


def nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · dequant(W)ᵀ + bias with the Triton kernels; differentiable w.r.t. x (and bias)."""
    y = NF4MatMul.apply(x, q)
    return y if bias is None else y + bias
