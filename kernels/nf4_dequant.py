"""Triton kernel: dequantize an NF4 weight (bitsandbytes layout, optional double quantization) to a dense tensor.

Also home of the three building blocks every NF4 kernel here shares (nf4_matmul.py imports them):
`_byte_table` / `_lookup` (bytes → NF4 values without a global gather) and `_block_scale` (the two-level absmax).

Algorithm. The flattened, row-major weight is cut into sub-blocks of S = min(blocksize, 64) weights, i.e. S/2
bytes; a sub-block never crosses a quant block, so it has one scale. One program handles ROWS consecutive
sub-blocks, a (ROWS, S/2) tile of bytes:

    byte          = packed[r * S/2 + j]                       # (ROWS, S/2), 16 contiguous bytes per thread
    hi, lo        = table[2 * byte], table[2 * byte + 1]      # values of the high / low nibble (fp32)
    scale[r]      = absmax of quant block (r * S) // blocksize  (two-level decode when double-quantized)
    out[r*S + 2j] = cast(hi * scale),  out[r*S + 2j + 1] = cast(lo * scale)  # first element in the high nibble

All arithmetic is the same fp32 sequence as minilora.quant.nf4.dequantize_nf4 (and bitsandbytes), so the result is
bit-identical to the reference, not just close. Memory traffic per weight: 0.5 byte read (+ 1/64 byte of absmax)
and 2 bytes written for bf16 — a write-bound kernel. Used by the matmul launcher for large M (dequantize once, then
cuBLAS), for in_features the fused kernels do not tile, and by benchmarks.

Tricks, each needed for the GPU code to be fast (counts: benchmarks/kernel_sass_proxy.py):
- 16-byte loads and stores. A thread holds 16 consecutive bytes (32 weights) and writes them as 64 contiguous
  bf16 bytes. The compiler only vectorises what it can prove aligned and contiguous, so the tile is indexed by
  sub-block (r * S/2 + j, with tl.multiple_of / tl.max_contiguous hints) and masked by whole sub-block only
  (a mask that changes inside a 16-byte group forces byte loads). A weight whose size is not a multiple of S gets
  its packed bytes padded by the launcher (a copy, never for real layers: their sizes are multiples of 64).
- No global gather for the code: the 16-entry table is expanded once per program into a 512-entry byte table
  (`_byte_table`: both nibbles' values of each byte, side by side), and tl.gather on it is lowered by Triton to
  a shared-memory lookup: one 8-byte LDS per byte, the nibble unpack included — instead of 2 global loads per
  byte from the 16-entry table.
- One scale load per sub-block (a (ROWS,) vector broadcast over the row), not one per weight.

Not handled: FP4; numel >= 2**31 (int32 indexing; the launcher refuses).
"""

import torch
import triton
import triton.language as tl

from minilora.quant.nf4 import NESTED_BLOCKSIZE, NF4Weight

# --- reference (PyTorch) -----------------------------------------------------------------------------------------


def reference_dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize with plain PyTorch ops, one line per step of the pseudo-code above (flat index form)."""
    n = q.numel
    i = torch.arange(n, device=q.device)  # flat index of every weight
    byte = q.packed.view(-1)[i // 2].long()
    nibble = torch.where(i % 2 == 0, byte >> 4, byte & 0x0F)
    b = i // q.blocksize
    if q.double_quant:
        absmax = q.nested_quant_map[q.absmax[b].long()] * q.nested_absmax[b // NESTED_BLOCKSIZE] + q.offset
    else:
        absmax = q.absmax[b]
    return (q.quant_map[nibble] * absmax).view(q.shape).to(dtype or q.dtype)


# --- building blocks shared with nf4_matmul.py -------------------------------------------------------------------


@triton.jit
def _byte_table(quant_map_ptr):
    """(512,) fp32: entries 2b and 2b + 1 are the NF4 values of byte b's high and low nibble.

    Built once per program (outside any loop) from the 16-entry code: 512 loads of a 64-byte array, ~4 per thread.
    """
    i = tl.arange(0, 512)
    b = i >> 1
    return tl.load(quant_map_ptr + tl.where((i & 1) == 0, b >> 4, b & 15))


@triton.jit
def _lookup(table, byte):
    """(hi, lo): the NF4 values of the high and low nibble of every byte (int32 in 0..255), both fp32, byte's shape.

    tl.gather from a tensor held in registers: Triton stages `table` in shared memory and reads the entries by
    index (LDS). Indexing by the whole byte does the nibble unpack for free, and the pair of one byte sits in
    adjacent entries, which one 8-byte shared load reads. A 1-D gather is what Triton lowers this way; a 2-D one
    becomes warp shuffles (measured: ~13x more instructions), hence the reshapes.
    """
    pair = tl.join(2 * byte, 2 * byte + 1)  # (..., 2) entry indices
    values = tl.reshape(tl.gather(table, tl.reshape(pair, (pair.numel,)), 0), pair.shape)
    return tl.split(values)


@triton.jit
def _block_scale(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, b, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of quant blocks `b` (any shape, all in range): nested_map[code8[b]] * nested_absmax[b // 256]
    + offset — the same fp32 operations as the reference (the dequantize launch turns off FMA fusion for this)."""
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + b).to(tl.int32)
        return tl.load(nested_map_ptr + code8) * tl.load(nested_absmax_ptr + b // 256) + offset
    else:
        return tl.load(absmax_ptr + b)


# --- kernel ------------------------------------------------------------------------------------------------------


@triton.jit
def _nf4_dequant_kernel(
    # pointers
    packed_ptr,  # uint8 (n_sub * HALF,): the codes, padded to whole sub-blocks
    absmax_ptr,  # uint8 codes (DOUBLE_QUANT) or fp32 scales, one per quant block
    nested_absmax_ptr,  # fp32, one per 256 quant blocks (DOUBLE_QUANT only)
    nested_map_ptr,  # fp32 (256,) dynamic code (DOUBLE_QUANT only)
    quant_map_ptr,  # fp32 (16,) NF4 values
    out_ptr,  # (n_sub * 2 * HALF,) output dtype
    # scalars
    offset,  # fp32 mean subtracted before double quantization
    n_sub,  # sub-blocks of 2 * HALF weights
    # meta-parameters
    QBLOCK: tl.constexpr,  # quantization block size (64)
    DOUBLE_QUANT: tl.constexpr,
    HALF: tl.constexpr,  # bytes per sub-block: min(QBLOCK, 64) // 2
    ROWS: tl.constexpr,  # sub-blocks per program
):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,) sub-block indices
    r_mask = r < n_sub
    j = tl.arange(0, HALF)
    table = _byte_table(quant_map_ptr)

    # --- 16-byte loads: each row of the tile is HALF contiguous, HALF-aligned bytes, masked as a whole.
    byte_idx = tl.multiple_of(r * HALF, HALF)[:, None] + tl.max_contiguous(j, HALF)[None, :]  # (ROWS, HALF)
    byte = tl.load(packed_ptr + byte_idx, mask=r_mask[:, None], other=0).to(tl.int32)
    hi, lo = _lookup(table, byte)  # (ROWS, HALF) each: weights r*S + 2j and r*S + 2j + 1

    # --- one scale per sub-block: the sub-block lies inside quant block (r * S) // QBLOCK (r clamped: in range).
    b = (tl.minimum(r, n_sub - 1) * 2 * HALF) // QBLOCK
    scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, b, DOUBLE_QUANT)  # (ROWS,)
    w = tl.reshape(tl.join(hi * scale[:, None], lo * scale[:, None]), (ROWS, 2 * HALF))  # interleave: k order

    # --- 16-byte stores: 2 * HALF contiguous outputs per row.
    out_idx = tl.multiple_of(r * 2 * HALF, 2 * HALF)[:, None] + tl.max_contiguous(tl.arange(0, 2 * HALF), 2 * HALF)
    tl.store(out_ptr + out_idx, w.to(out_ptr.dtype.element_ty), mask=r_mask[:, None])


# --- launcher ----------------------------------------------------------------------------------------------------

BYTES_PER_PROGRAM = 4096  # 4 warps x 32 threads x 32 bytes: two 16-byte loads and 64 weights per thread
NUM_WARPS = 4


def sub_block_bytes(blocksize: int) -> int:
    """Bytes per sub-block: a sub-block is min(blocksize, 64) weights, so it always has a single scale."""
    return min(64, blocksize) // 2


def dequant_meta(blocksize: int, double_quant: bool) -> dict:
    """The constexprs and launch options of _nf4_dequant_kernel (also read by benchmarks/kernel_sass_proxy.py)."""
    half = sub_block_bytes(blocksize)
    return dict(QBLOCK=blocksize, DOUBLE_QUANT=double_quant, HALF=half, ROWS=BYTES_PER_PROGRAM // half,
                num_warps=NUM_WARPS, enable_fp_fusion=False)  # fmt: skip  (no FMA: bit-identical to the reference)


def triton_dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize `q` on its device with the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check_weight(q)
    meta = dequant_meta(q.blocksize, q.double_quant)
    half = meta["HALF"]
    n_sub = triton.cdiv(q.numel, 2 * half)
    packed = q.packed.view(-1)
    if packed.numel() != n_sub * half:  # a partial last sub-block: pad the codes, so no load is masked per byte
        packed = torch.nn.functional.pad(packed, (0, n_sub * half - packed.numel()))
    out = torch.empty(n_sub * 2 * half, dtype=dtype or q.dtype, device=q.device)  # padded too, cut below
    grid = (triton.cdiv(n_sub, meta["ROWS"]),)
    _nf4_dequant_kernel[grid](
        packed, q.absmax, _or_dummy(q.nested_absmax, q), _or_dummy(q.nested_quant_map, q), q.quant_map, out,
        q.offset, n_sub, **meta,
    )  # fmt: skip
    return out[: q.numel].view(q.shape)


def _check_weight(q: NF4Weight) -> None:
    """The kernels index with int32 and read the tensors as flat, contiguous arrays on one device."""
    if q.numel >= 2**31 - 2 * BYTES_PER_PROGRAM:
        raise ValueError(f"NF4 weight with {q.numel} elements is too large for int32 indexing")
    tensors = [q.packed, q.absmax, q.quant_map] + ([q.nested_absmax, q.nested_quant_map] if q.double_quant else [])
    for t in tensors:
        if not t.is_contiguous() or t.device != q.device:
            raise ValueError("NF4Weight tensors must be contiguous and on one device (use NF4Weight.to(device))")
    if q.quant_map.dtype != torch.float32 or (q.double_quant and q.absmax.dtype != torch.uint8):
        raise ValueError("NF4Weight: quant_map must be fp32 and the double-quantized absmax uint8")


def _or_dummy(t: torch.Tensor | None, q: NF4Weight) -> torch.Tensor:
    """Triton needs a tensor for every pointer argument; the kernel never reads it when DOUBLE_QUANT is False."""
    return t if t is not None else q.quant_map


# --- public function ---------------------------------------------------------------------------------------------


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight of shape q.shape in `dtype` (default q.dtype). No autograd: the 4-bit weight is frozen."""
    return triton_dequantize(q, dtype)
