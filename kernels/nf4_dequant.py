"""Triton kernel: dequantize an NF4 weight (bitsandbytes layout, optional double quantization) to a dense tensor.

Algorithm (one program per BLOCK consecutive weights of the flattened, row-major weight):

    for i in my BLOCK indices:                        # i = flat index, i < numel
        byte   = packed[i // 2]
        nibble = byte >> 4 if i is even else byte & 0xF   # first element in the high nibble (bnb order)
        b      = i // blocksize                       # which 64-block i belongs to
        if double_quant:
            absmax = nested_quant_map[absmax_code[b]] * nested_absmax[b // 256] + offset
        else:
            absmax = absmax_fp32[b]
        out[i] = cast(quant_map[nibble] * absmax)     # product in fp32, one rounding to the output dtype

All arithmetic is the same fp32 sequence as minilora.quant.nf4.dequantize_nf4 (and bitsandbytes), so the result is
bit-identical to the reference, not just close. Memory traffic per weight: 0.5 byte read (+ 1/64 byte of absmax)
and 2 bytes written for bf16 — a write-bound kernel. Used by the matmul launcher's fallback for shapes the fused
kernel does not tile (in_features not a multiple of 64) and by benchmarks; training never needs the dense weight.
"""

import torch
import triton
import triton.language as tl

from minilora.quant.nf4 import NESTED_BLOCKSIZE, NF4Weight

# --- reference (PyTorch) -----------------------------------------------------------------------------------------


def reference_dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize with plain PyTorch ops, one line per step of the pseudo-code above."""
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


# --- kernel ------------------------------------------------------------------------------------------------------


@triton.jit
def _nf4_dequant_kernel(
    # pointers
    packed_ptr,  # uint8 (numel + 1) // 2
    absmax_ptr,  # uint8 codes (DOUBLE_QUANT) or fp32 scales, one per quant block
    nested_absmax_ptr,  # fp32, one per 256 quant blocks (DOUBLE_QUANT only)
    nested_map_ptr,  # fp32 (256,) dynamic code (DOUBLE_QUANT only)
    quant_map_ptr,  # fp32 (16,) NF4 values
    out_ptr,  # numel, output dtype
    # scalars
    offset,  # fp32 mean subtracted before double quantization
    numel,
    # meta-parameters
    QBLOCK: tl.constexpr,  # quantization block size (64)
    DOUBLE_QUANT: tl.constexpr,
    BLOCK: tl.constexpr,  # weights per program
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat indices
    mask = i < numel

    # --- nibble unpack: byte i // 2 holds element i in its high nibble when i is even, in its low nibble when odd.
    # Neighbouring lanes read the same byte; the hardware merges those loads into one transaction.
    byte = tl.load(packed_ptr + i // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - i % 2) * 4)) & 0xF

    # --- code lookup: a gather from the 16-entry table (64 bytes, stays in L1).
    value = tl.load(quant_map_ptr + nibble, mask=mask, other=0.0)

    # --- two-level absmax: the 8-bit code of this block's scale, decoded with the block-of-256 scale + offset.
    b = i // QBLOCK
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + b, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + b // 256, mask=mask, other=0.0)
        absmax = tl.load(nested_map_ptr + code8, mask=mask, other=0.0) * nested + offset
    else:
        absmax = tl.load(absmax_ptr + b, mask=mask, other=0.0)

    tl.store(out_ptr + i, (value * absmax).to(out_ptr.dtype.element_ty), mask=mask)


# --- launcher ----------------------------------------------------------------------------------------------------

BLOCK = 1024  # 1024 weights = 512 packed bytes per program; 4 warps give 8 outputs per thread


def triton_dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize `q` on its device with the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check_weight(q)
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.device)
    grid = (triton.cdiv(q.numel, BLOCK),)
    _nf4_dequant_kernel[grid](
        q.packed, q.absmax, _or_dummy(q.nested_absmax, q), _or_dummy(q.nested_quant_map, q), q.quant_map, out,
        q.offset, q.numel,
        QBLOCK=q.blocksize, DOUBLE_QUANT=q.double_quant, BLOCK=BLOCK,
        enable_fp_fusion=False,  # no FMA for map * nested + offset: bit-identical to the reference on a GPU too
    )  # fmt: skip
    return out


def _check_weight(q: NF4Weight) -> None:
    """The kernels index with int32 and read the tensors as flat, contiguous arrays on one device."""
    if q.numel >= 2**31 - 2 * BLOCK:
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
