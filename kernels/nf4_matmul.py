"""Triton kernels: y = x · dequant(W)ᵀ and its input gradient for a frozen NF4 weight, dequantizing in registers.

W is (N, K) = (out_features, in_features), stored as bitsandbytes NF4 (see minilora/quant/nf4.py); x is (M, K).
Below DENSE_MIN_M rows the dense W is never written to memory: each kernel reads 4-bit codes and rebuilds a tile
of W right before it is multiplied, so the weight costs 0.516 byte of memory traffic per element instead of 2.

The tile all kernels share — BLOCK_N rows of W by BLOCK_K consecutive columns, S = min(blocksize, 64):

    bytes   = packed[n * K/2 + k0/2 : + BLOCK_K/2]        # row n starts at byte n*K/2; K % 64 == 0 (see _fused_ok)
    hi, lo  = table[2 * bytes], table[2 * bytes + 1]      # W[n, k0 + 2j] / W[n, k0 + 2j + 1] before scaling
    scale   = absmax of each S-column sub-block            # never crosses a quant block (blocks may straddle rows)

Kernels
    GEMV (decode, M <= GEMV_MAX_M):  one program per BLOCK_N rows of W and one K-slice, all M rows of x at once:
        for each sub-block:  part[m, n] = Σ_j hi[n, j] x[m, k0+2j] + lo[n, j] x[m, k0+2j+1]   (the "code sum")
                             acc[m, n] += part[m, n] * scale[n]           (the scale once per 64 weights)
        split-K: the slices of one row block add their acc into an fp32 y with atomics (no second launch).
    GEMM (training forward, GEMV_MAX_M < M < DENSE_MIN_M):  tile (BLOCK_N, BLOCK_M) of yᵀ:
        accᵀ += dot(W_tile (BLOCK_N, BLOCK_K), x_tileᵀ (BLOCK_K, BLOCK_M))
        W is the *left* operand: on sm_90 a wgmma takes its left operand from registers, where the dequantized
        tile already is, so it only needs a layout shuffle (through shared memory: 4 STS.128 + 4 LDSM per thread
        and K-step for the 128x128 tile, against 28 STS.128 + 16 STS.16 and 44 barriers when W was the right
        operand); x arrives by the pipelined asynchronous copy (cp.async) Triton emits.
    GRAD (backward, M < DENSE_MIN_M):  grad_x tile (BLOCK_M, BLOCK_K) = Σ_n dot(grad_y (BLOCK_M, BLOCK_N), W_tile).
    M >= DENSE_MIN_M:  dequantize once (nf4_dequant.py), then cuBLAS — faster once the matmul is long enough to
        hide the 2-byte write and read of W (the crossover is measured by benchmarks/bench_nf4_kernels.py).

Rounding. The GEMV multiplies the exact fp32 code values by x in fp32 and the scale afterwards, so it never rounds
W to x's dtype; the GEMM and GRAD round each dequantized weight to x's dtype (the tensor cores need it), as the
reference F.linear(x, dequantize_nf4(q, x.dtype)) does. So the difference to the reference is the fp32 summation
order and one rounding of y, plus (GEMV) W left unrounded (bounds derived in tests/test_kernels.py); on a GPU the
compiler may also fuse a multiply-add into an FMA (these kernels keep fusion on for speed; the dequantize kernel
turns it off to stay bit-identical).

Tricks (their effect on the SASS: benchmarks/kernel_sass_proxy.py, results in benchmarks/results/):
- 16-byte code loads: a row of the tile is BLOCK_K/2 >= 32 contiguous bytes; the row start is proven 16-aligned
  with tl.multiple_of (K % 64 == 0, so n * K/2 is a multiple of 32) and the columns with tl.max_contiguous. No
  mask varies along k: rows past N are clamped to row N-1 (read twice, never stored) instead of masked.
- Code lookup from shared memory, not global gathers: nf4_dequant._lookup (tl.gather from a 512-entry byte table).
- The block scale once per sub-block in the GEMV (code sums first), once per weight in the tiled kernels (there it
  is shared by BLOCK_M rows of x).
- All M <= 4 rows of x in one GEMV program (the weight is decoded once, not once per row), split-K reduced in the
  kernel by fp32 atomic adds (so the order of the K-slice sums is not fixed: results may differ in the last bits
  from one run to the next when split_k > 1; a single slice is deterministic).
- The GEMM's tiles and pipeline depth are autotuned per M bucket (a few configurations; one under the interpreter,
  where autotuning cannot time anything).

Not handled: in_features not a multiple of 64 falls back to the Triton dequantize + a torch matmul, as
bitsandbytes does (real models never hit it); no grad wrt W: the 4-bit weight is frozen.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from minilora.kernels.nf4_dequant import (
    _block_scale, _byte_table, _check_weight, _lookup, _or_dummy, sub_block_bytes, triton_dequantize,
)  # fmt: skip
from minilora.quant.nf4 import NF4Weight, dequantize_nf4

# --- reference (PyTorch) -----------------------------------------------------------------------------------------


def reference_nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · dequant(W)ᵀ + bias, the dense weight in x's dtype. Autograd gives grad_x = grad_y · dequant(W)."""
    return F.linear(x, dequantize_nf4(q, x.dtype), bias)


# --- kernels -----------------------------------------------------------------------------------------------------


@triton.jit
def _load_codes(packed_ptr, rows, k0, K, BLOCK_K: tl.constexpr):
    """(len(rows), BLOCK_K/2) int32 bytes of W[rows, k0 : k0 + BLOCK_K], loaded 16 bytes at a time."""
    row_start = tl.multiple_of(rows * (K // 2), 32)  # K % 64 == 0: every row starts 32-byte aligned
    cols = tl.max_contiguous(tl.multiple_of(k0 // 2 + tl.arange(0, BLOCK_K // 2), 16), BLOCK_K // 2)
    return tl.load(packed_ptr + row_start[:, None] + cols[None, :]).to(tl.int32)


@triton.jit
def _scales(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, rows, k0, K,
            QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """(len(rows), BLOCK_K / (2*HALF)) fp32: the absmax of each 2*HALF-weight sub-block of the tile."""
    sub = tl.arange(0, BLOCK_K // (2 * HALF)) * (2 * HALF)
    b = (rows[:, None] * K + k0 + sub[None, :]) // QBLOCK  # quant block of each sub-block's first weight
    return _block_scale(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, b, DOUBLE_QUANT)


@triton.jit
def _dequant_tile(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, table, offset, rows, k0, K,
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """W[rows, k0 : k0 + BLOCK_K] in fp32, columns in natural order. (len(rows), BLOCK_K)"""
    hi, lo = _lookup(table, _load_codes(packed_ptr, rows, k0, K, BLOCK_K))  # (R, BLOCK_K/2) each
    scale = _scales(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, rows, k0, K, QBLOCK, DOUBLE_QUANT,
                    HALF, BLOCK_K)  # fmt: skip  (R, NSUB)
    R: tl.constexpr = rows.shape[0]
    NSUB: tl.constexpr = BLOCK_K // (2 * HALF)
    w = tl.reshape(tl.join(hi, lo), (R, NSUB, 2 * HALF))  # interleave high/low nibbles: k order
    return tl.reshape(w * scale[:, :, None], (R, BLOCK_K))


@triton.jit
def _code_sum(hi, lo, x_ptr, m, M, stride_xm, k0, HALF: tl.constexpr):
    """Σ_j hi[n, j] * x[m, k0 + 2j] + lo[n, j] * x[m, k0 + 2j + 1] for one row m of x, in fp32. (BLOCK_N,)

    A 16-bit x is read as int32 pairs (even element in the low half: little-endian), so a thread's 16 pairs are
    four 16-byte loads, and a bf16 becomes fp32 by a shift (it is the upper half of an fp32). fp32 x (not the
    decode path) is read with two strided loads. Rows m >= M read zeros.
    """
    j = tl.max_contiguous(tl.multiple_of(k0 // 2 + tl.arange(0, HALF), 16), HALF)  # pair indices within the row
    dtype = x_ptr.dtype.element_ty
    in_x = tl.full((HALF,), m, tl.int32) < M  # a row past M (M rounded up) reads zeros
    if dtype == tl.float32:
        ptrs = x_ptr + m * stride_xm + 2 * j
        x_even = tl.load(ptrs, mask=in_x, other=0.0)
        x_odd = tl.load(ptrs + 1, mask=in_x, other=0.0)
    else:
        v = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + m * (stride_xm // 2) + j, mask=in_x, other=0)
        if dtype == tl.bfloat16:
            x_even = (v << 16).to(tl.float32, bitcast=True)
            x_odd = (v & -65536).to(tl.float32, bitcast=True)
        else:
            x_even = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x_odd = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return tl.sum(hi * x_even[None, :] + lo * x_odd[None, :], axis=1)  # a multiply, an FMA and an add per byte


@triton.jit
def _nf4_gemv_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, quant_map_ptr,
    y_ptr,  # (M, N): y itself (SPLIT_K == 1) or an fp32 buffer of zeros the K-slices add into
    # scalars
    offset, M, N, K, k_per_split,  # k_per_split: columns per K-slice, a multiple of 2 * HALF
    stride_xm, stride_ym,  # stride_xm even for 16-bit x (the launcher makes sure)
    # meta-parameters
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HALF: tl.constexpr,  # bytes per sub-block: one scale per row and iteration
    BLOCK_N: tl.constexpr,  # rows of W per program: BLOCK_N * HALF bytes per iteration
    M_PAD: tl.constexpr,  # rows of x handled: 1, 2 or 4 (M rounded up)
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) rows of W = columns of y
    rows_in = tl.minimum(rows, N - 1)  # clamp instead of masking the loads (a mask would forbid 16-byte loads)
    table = _byte_table(quant_map_ptr)

    # One accumulator per row of x, written out (not a (M_PAD, BLOCK_N) tensor): a 3-D product tile gets a
    # layout that shuffles every operand through shared memory (measured: 2.5x the instructions).
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), 2 * HALF):  # one sub-block per row
        hi, lo = _lookup(table, _load_codes(packed_ptr, rows_in, k0, K, 2 * HALF))  # (BLOCK_N, HALF) exact fp32
        scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, (rows_in * K + k0) // QBLOCK,
                             DOUBLE_QUANT)  # fmt: skip  (BLOCK_N,)
        # The code sum over the sub-block first, then its scale: one multiply per 2 * HALF weights, not per weight.
        # Every row of x reuses the decoded codes.
        acc0 += _code_sum(hi, lo, x_ptr, 0, M, stride_xm, k0, HALF) * scale
        if M_PAD > 1:
            acc1 += _code_sum(hi, lo, x_ptr, 1, M, stride_xm, k0, HALF) * scale
        if M_PAD > 2:
            acc2 += _code_sum(hi, lo, x_ptr, 2, M, stride_xm, k0, HALF) * scale
            acc3 += _code_sum(hi, lo, x_ptr, 3, M, stride_xm, k0, HALF) * scale

    _store_row(y_ptr, acc0, 0, M, N, rows, stride_ym, SPLIT_K)
    if M_PAD > 1:
        _store_row(y_ptr, acc1, 1, M, N, rows, stride_ym, SPLIT_K)
    if M_PAD > 2:
        _store_row(y_ptr, acc2, 2, M, N, rows, stride_ym, SPLIT_K)
        _store_row(y_ptr, acc3, 3, M, N, rows, stride_ym, SPLIT_K)


@triton.jit
def _store_row(y_ptr, acc, m, M, N, rows, stride_ym, SPLIT_K: tl.constexpr):
    """y[m, rows] = acc, or += with atomics when several K-slices share the row (y is then fp32 zeros)."""
    mask = (rows < N) & (tl.full(rows.shape, m, tl.int32) < M)
    if SPLIT_K == 1:
        tl.store(y_ptr + m * stride_ym + rows, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # "relaxed": a plain reduction (RED), no ordering with other memory operations is needed
        tl.atomic_add(y_ptr + m * stride_ym + rows, acc, mask=mask, sem="relaxed")


def _gemm_configs():
    """A small autotuning list (tiles, warps, pipeline depth); the interpreter gets one config it runs quickly."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    return [
        # Untimed starting points (no GPU in the session that wrote them): wgmma wants BLOCK_N (its M) a multiple
        # of 64 per warpgroup; small M gets a narrow BLOCK_M so that more programs run.
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        # (128 x 256 with 8 warps: no better on sm_90 by the SASS proxy, and 255 registers + spills on sm_80/89.)
    ]


GEMM_CONFIGS = _gemm_configs()


@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit
def _nf4_gemm_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, quant_map_ptr, y_ptr,
    # scalars
    offset, M, N, K,
    stride_xm, stride_ym,
    M_BUCKET,  # the autotuning key for M: next power of two (the kernel does not read it)
    # meta-parameters
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HALF: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,  # autotuned
):  # fmt: skip
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)  # n fastest: programs running together share the x tile
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) rows of W = columns of y
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    n_in = tl.minimum(rows_n, N - 1)  # clamped, not masked: 16-byte code loads
    m_mask = rows_m < M
    table = _byte_table(quant_map_ptr)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # yᵀ tile
    for k0 in range(0, K, BLOCK_K):
        w = _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, table, offset, n_in, k0, K,
                          QBLOCK, DOUBLE_QUANT, HALF, BLOCK_K)  # fmt: skip  (BLOCK_N, BLOCK_K) fp32
        cols = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), 16), BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None], other=0.0)
        # W rounded to x's dtype for the tensor cores; "ieee": fp32 activations get a true fp32 product (torch's
        # default), not tf32; 16-bit dtypes ignore it.
        acc = tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(x), acc, input_precision="ieee")  # (BLOCK_N, BLOCK_M)
    y_ptrs = y_ptr + rows_m[None, :] * stride_ym + rows_n[:, None]  # the transposed tile lands in y (M, N)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows_n < N)[:, None] & m_mask[None, :])


@triton.jit
def _nf4_grad_input_kernel(
    # pointers
    gy_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, quant_map_ptr, gx_ptr,
    # scalars
    offset, M, N, K,
    stride_gym, stride_gxm,
    # meta-parameters
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    k0 = pid_k * BLOCK_K  # this program owns columns k0 .. k0 + BLOCK_K of grad_x
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    m_mask = rows_m < M
    table = _byte_table(quant_map_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):  # the reduction runs over W's rows
        rows_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = rows_n < N
        gy = tl.load(
            gy_ptr + rows_m[:, None] * stride_gym + rows_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0
        )  # (BLOCK_M, BLOCK_N); zeros past N cancel the clamped rows of W below
        w = _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, table, offset,
                          tl.minimum(rows_n, N - 1), k0, K, QBLOCK, DOUBLE_QUANT, HALF, BLOCK_K)  # fmt: skip
        acc = tl.dot(gy, w.to(gy_ptr.dtype.element_ty), acc, input_precision="ieee")  # (BLOCK_M, BLOCK_K)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(gx_ptr + rows_m[:, None] * stride_gxm + cols[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=m_mask[:, None])  # fmt: skip


# --- launchers ---------------------------------------------------------------------------------------------------

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_M = 4  # up to 4 rows of x share one decode of W (bnb also switches kernels at M = 4); unmeasured here
# From this many rows of x on, dequantize + cuBLAS: the dequantize writes and re-reads W in bf16 (~4.5 bytes per
# weight of extra traffic: ~1.4 ms per 1e9 weights on an H100), while the matmul takes 2*M flops per weight at
# ~0.7 PFLOP/s; so the extra pass costs < 10% of the matmul above M ~ 4000 and a fused kernel must be near
# cuBLAS speed to beat it below. 2048 is an estimate: TO BE MEASURED on a GPU (benchmarks/gpu_checks.sh runs
# bench_nf4_kernels.py, which prints the crossover: the smallest M where dequantize + cuBLAS wins).
DENSE_MIN_M = 2048

# GEMV: bytes of codes per iteration by M_PAD. With 4 warps, 8 KB is 64 bytes per thread: four rows of one
# sub-block each, so each unpacked x value serves four rows and the per-iteration costs (staging the byte table,
# loop control) are spread over 128 weights. SASS proxy, sm_90, M=1: 4.57 instructions per weight at 8 KB (70
# registers), 5.08 at 4 KB; with more rows of x the 8 KB tile needs 191 (M=2) and 200 (M=4) registers instead of
# 116 and 124, a third of the occupancy, so they keep 4 KB until a GPU says otherwise.
GEMV_BYTES_PER_ITER = {1: 8192, 2: 4096, 4: 4096}
GEMV_NUM_WARPS = 4
GRAD_BLOCK = (16, 16, 64) if INTERPRET else (64, 64, 64)  # (BLOCK_M, BLOCK_N, BLOCK_K)
GRAD_NUM_WARPS, GRAD_NUM_STAGES = 4, 3

# Pipeline stages: Triton keeps num_stages tiles of the operands in flight in shared memory, which the GPU bounds
# per program (RTX 3090/4090, A10, L4: 99 KB; A100: 163 KB; H100: 227 KB). A launch that does not fit is retried
# with one stage fewer, and the depth that loaded is remembered per kernel, dtype and device.
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


def _fused_ok(q: NF4Weight) -> bool:
    """The fused kernels step through K 64 weights (32 bytes) at a time and prove every row 32-byte aligned."""
    return q.shape[1] % 64 == 0


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


def gemv_meta(M: int, blocksize: int, double_quant: bool) -> dict:
    """Constexprs and options of the GEMV for M rows (read by benchmarks/kernel_sass_proxy.py too)."""
    half, m_pad = sub_block_bytes(blocksize), triton.next_power_of_2(M)
    block_n = GEMV_BYTES_PER_ITER[m_pad] // half
    return dict(QBLOCK=blocksize, DOUBLE_QUANT=double_quant, HALF=half, BLOCK_N=block_n, M_PAD=m_pad,
                num_warps=GEMV_NUM_WARPS, num_stages=2,
                enable_fp_fusion=True)  # fmt: skip  (FMA allowed: the fused kernels are not bit-exact anyway)


def _split_k(n_programs: int, k_iters: int, device: torch.device) -> int:
    """Slices of K per row block so that a GEMV launches ~2 programs per SM (a small N alone cannot fill it)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(k_iters, triton.cdiv(2 * sms, n_programs)))


def nf4_gemv(x2: torch.Tensor, q: NF4Weight, split_k: int | None = None) -> torch.Tensor:
    """y = x2 · Wᵀ for a few rows, (M, K) → (M, N), M <= GEMV_MAX_M, with the GEMV kernel (K a multiple of 64)."""
    (M, K), N = x2.shape, q.shape[0]
    if M > GEMV_MAX_M:
        raise ValueError(f"nf4_gemv handles up to {GEMV_MAX_M} rows, got {M}")
    if x2.dtype != torch.float32 and (x2.stride(0) % 2 or x2.data_ptr() % 4):  # read as int32 pairs: 4-aligned
        x2 = x2.clone(memory_format=torch.contiguous_format)  # a fresh allocation (a view may start misaligned)
    meta = gemv_meta(M, q.blocksize, q.double_quant)
    step = 2 * meta["HALF"]  # columns per iteration
    k_iters = K // step
    n_blocks = triton.cdiv(N, meta["BLOCK_N"])
    split_k = min(split_k or _split_k(n_blocks, k_iters, x2.device), k_iters)
    k_per_split = triton.cdiv(k_iters, split_k) * step
    split_k = triton.cdiv(K, k_per_split)  # no empty slices
    # One slice: the kernel stores y itself. Several: they add into fp32 zeros, cast once at the end.
    if split_k == 1:
        y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    else:
        y = torch.zeros((M, N), dtype=torch.float32, device=x2.device)
    _nf4_gemv_kernel[(n_blocks, split_k)](
        x2, *_common_args(q), y,
        q.offset, M, N, K, k_per_split, x2.stride(0), y.stride(0),
        SPLIT_K=split_k, **meta,
    )  # fmt: skip
    return y if split_k == 1 else y.to(x2.dtype)  # (M, N)


def nf4_gemm(x2: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """y = x2 · Wᵀ, (M, K) → (M, N), with the autotuned GEMM kernel (K must be a multiple of 64)."""
    (M, K), N = x2.shape, q.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
    _nf4_gemm_kernel[grid](
        x2, *_common_args(q), y, q.offset, M, N, K, x2.stride(0), y.stride(0), triton.next_power_of_2(M),
        QBLOCK=q.blocksize, DOUBLE_QUANT=q.double_quant, HALF=sub_block_bytes(q.blocksize), enable_fp_fusion=True,
    )  # fmt: skip
    return y


def nf4_grad_input(gy2: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """grad_x = gy2 · W, (M, N) → (M, K), with the fused backward kernel (K must be a multiple of 64)."""
    (M, N), K = gy2.shape, q.shape[1]
    gx = torch.empty((M, K), dtype=gy2.dtype, device=gy2.device)
    block_m, block_n, block_k = GRAD_BLOCK
    grid = (triton.cdiv(M, block_m), K // block_k)
    args = (gy2, *_common_args(q), gx, q.offset, M, N, K, gy2.stride(0), gx.stride(0))
    meta = dict(QBLOCK=q.blocksize, DOUBLE_QUANT=q.double_quant, HALF=sub_block_bytes(q.blocksize),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, enable_fp_fusion=True)  # fmt: skip
    _launch(_nf4_grad_input_kernel, grid, args, meta, num_warps=GRAD_NUM_WARPS, num_stages=GRAD_NUM_STAGES)
    return gx


def forward_path(M: int, q: NF4Weight) -> str:
    """Which kernel computes y for M rows of x: "gemv", "gemm" or "dequantize + cuBLAS"."""
    if not _fused_ok(q) or M >= DENSE_MIN_M:
        return "dequantize + cuBLAS"
    return "gemv" if M <= GEMV_MAX_M else "gemm"


def backward_path(M: int, q: NF4Weight) -> str:
    """Which kernel computes grad_x for M rows of grad_y: "grad" (fused) or "dequantize + cuBLAS"."""
    return "dequantize + cuBLAS" if not _fused_ok(q) or M >= DENSE_MIN_M else "grad"


def nf4_linear_forward(x: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """y = x · dequant(W)ᵀ for x of shape (..., K): GEMV (M <= 4), GEMM, or dequantize + matmul (large M, or K
    not a multiple of 64)."""
    N, K = q.shape
    _check_inputs(x, q, K, "x")
    x2 = x.reshape(-1, K)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty((*x.shape[:-1], N))
    path = forward_path(M, q)
    if path == "gemv":
        y = nf4_gemv(x2, q)
    elif path == "gemm":
        y = nf4_gemm(x2, q)
    else:
        y = x2 @ triton_dequantize(q, x.dtype).t()
    return y.view(*x.shape[:-1], N)


def nf4_linear_backward(grad_y: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """grad_x = grad_y · dequant(W) for grad_y of shape (..., N)."""
    N, K = q.shape
    _check_inputs(grad_y, q, N, "grad_y")
    gy2 = grad_y.reshape(-1, N)  # (M, N)
    if gy2.stride(-1) != 1:
        gy2 = gy2.contiguous()
    M = gy2.shape[0]
    if M == 0:
        return grad_y.new_zeros((*grad_y.shape[:-1], K))
    if backward_path(M, q) == "grad":
        gx = nf4_grad_input(gy2, q)
    else:
        gx = gy2 @ triton_dequantize(q, grad_y.dtype)
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
