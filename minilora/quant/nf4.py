"""4-bit NormalFloat (NF4) quantization with double quantization, bit-identical to bitsandbytes.

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) stores frozen base weights in 4 bits:

    1. Flatten W (row-major) and cut it into blocks of `blocksize` (64) values; a block may straddle rows.
    2. absmax[b] = max |w| over block b  (fp32)                                        (paper section 3, "Block-wise")
    3. code = the NF4 value nearest to w / absmax[b]: 16 quantiles of N(0, 1) scaled to [-1, 1]   ("4-bit NormalFloat")
    4. Two codes per byte, the first element in the high nibble → packed uint8 of shape [(numel + 1) // 2, 1].
    5. Double quantization ("Double Quantization"): offset = mean(absmax); the centred absmax values are quantized
       again with an 8-bit *dynamic* code (256 non-linear values) in blocks of 256, keeping one fp32 scale
       (nested_absmax) per 256 blocks. Per weight: 4 + 8/64 + 32/(64*256) ≈ 4.127 bits instead of 4 + 32/64 = 4.5.

    Dequantize:  absmax[b] = nested_quant_map[absmax_code[b]] * nested_absmax[b // 256] + offset   (fp32)
                 w[i]      = quant_map[nibble[i]] * absmax[i // blocksize]                     (fp32, then cast)

The layout, the rounding rules and the checkpoint keys follow bitsandbytes 0.50 (`quantize_4bit(...,
quant_type="nf4")`), measured against its CPU path in tests/test_nf4.py. Three details decide bit-exactness:

- 4-bit rounding: scaled = clamp(w * (1 / absmax), -1, 1) in fp32 (a reciprocal, then a multiply), then the index
  of the first midpoint between neighbouring codes that is >= scaled, so a value exactly on a midpoint takes the
  lower code. bnb divides (w / absmax) in the last, partial block instead, and stores its absmax clamped to >= 1e-38.
- 8-bit rounding of the absmax: bnb's CPU kernel does not search for the nearest of the 256 dynamic values; it maps
  clamp(x * (1 / absmax), -1, 1) onto a 65536-entry table (index = int((x + 1) * 0.5 * 65535 + 0.5)) whose entries
  hold the code nearest to each table point. So a code is off by one from the exact nearest where x lies within a
  table step (3.1e-5) of a midpoint or where codes are denser than that (near 0): 0.2% of the absmax codes of a
  Gaussian 4096x4096 weight, each still within half a code gap + 3.1e-5 of x (times nested_absmax). bnb's CUDA
  kernel searches exactly, so bitsandbytes on a GPU can give different absmax codes for the same weight (not
  checked here: no GPU).
- An odd number of weights gets a padding nibble holding the code of 0.0 (7).

Not handled: FP4 (bnb's other 4-bit type), quant_storage other than uint8, nested block sizes other than 256.
"""

import json
from dataclasses import dataclass, field, replace

import torch

from ..errors import MiniloraError

# The 16 NF4 values, index 0..15: quantiles of N(0, 1) normalised to [-1, 1], with an exact 0 (QLoRA appendix).
# bitsandbytes hard-codes these fp32 numbers (functional.get_4bit_type("nf4")); they are sorted.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip

NESTED_BLOCKSIZE = 256  # the absmax values are double-quantized in blocks of 256 (QLoRA section 3)
_LUT_SIZE = 65536  # bnb's CPU 8-bit quantizer looks the code up in a table of this many points over [-1, 1]
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def create_dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2015, https://arxiv.org/abs/1511.04561): 256 sorted fp32.

    For exponent e = 0..6 there are 2**e values 10**(e-6) * m for both signs, where m are the midpoints of
    2**e + 1 evenly spaced points on [0.1, 1]; plus 0 and 1.0. So the code is dense near 0 (steps of ~1e-7) and
    coarse near ±1 (steps of ~0.014). Arithmetic as in bnb: linspace and midpoints in fp32, scaled in fp32.
    """
    values = []
    for e in range(7):
        points = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (points[:-1] + points[1:]) / 2.0  # (2**e,)
        scale = 10 ** (e - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


@dataclass
class NF4Weight:
    """A weight quantized to NF4: the packed codes plus everything needed to dequantize them."""

    packed: torch.Tensor  # uint8 [(numel + 1) // 2, 1]; element 2i in the high nibble of byte i, 2i+1 in the low
    absmax: torch.Tensor  # per 64-block: uint8 codes into nested_quant_map (double_quant) or fp32 scales
    nested_absmax: torch.Tensor | None  # fp32 per 256 absmax values (double_quant only)
    nested_quant_map: torch.Tensor | None  # fp32 (256,) the dynamic code (double_quant only)
    offset: float  # mean of the fp32 absmax, subtracted before double quantization (0.0 without it)
    quant_map: torch.Tensor  # fp32 (16,) the NF4 code values
    shape: torch.Size  # original weight shape, e.g. (out_features, in_features)
    dtype: torch.dtype  # original weight dtype; dequantize_nf4 returns this by default
    blocksize: int = 64
    double_quant: bool = True
    # Derived from quant_map on first use (see pair_table); not a constructor argument, so replace() resets it.
    _pair_table: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def pair_table(self) -> torch.Tensor:
        """The 256-entry byte → (high, low) NF4 value table of dequantize_nf4, built once per weight."""
        if self._pair_table is None:
            self._pair_table = _nf4_pair_table(self.quant_map)
        return self._pair_table

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors that grow with the weight: codes, absmax, nested absmax and the 4-byte offset.

        The two code tables (16 + 256 fp32 = 1088 bytes) are constants shared by every layer and not counted, nor
        is the 2 KB pair_table the PyTorch dequantize derives from quant_map.
        """
        n = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            n += self.nested_absmax.numel() * 4 + 4
        return n

    @property
    def bits_per_parameter(self) -> float:
        """8 * nbytes / numel: 4.127 with double quantization (4.5 without) once the weight spans many blocks."""
        return 8 * self.nbytes / self.numel

    def to(self, device) -> "NF4Weight":
        """A copy on `device` (dtypes never change: rounding the fp32 scales would break the format)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            nested_absmax=move(self.nested_absmax),
            nested_quant_map=move(self.nested_quant_map),
            quant_map=move(self.quant_map),
        )

    # --- Hugging Face / bitsandbytes checkpoint tensors -------------------------------------------------------

    def to_hf_state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors transformers + bitsandbytes save for one 4-bit linear, keyed `<prefix>.weight...`.

        `prefix` is the module path, e.g. "model.layers.0.self_attn.q_proj" ("" gives bare "weight" keys).
        The non-tensor fields travel as the UTF-8 bytes of a JSON object in `weight.quant_state.bitsandbytes__nf4`,
        written with the same key order and `json.dumps` spacing as bnb, so the bytes are identical too.
        """
        key = f"{prefix}.weight" if prefix else "weight"
        info = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype)}
        info["shape"] = list(self.shape)
        state = {key: self.packed, f"{key}.absmax": self.absmax, f"{key}.quant_map": self.quant_map}
        if self.double_quant:
            state[f"{key}.nested_absmax"] = self.nested_absmax
            state[f"{key}.nested_quant_map"] = self.nested_quant_map
            info.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset)
        state[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
        return state

    @classmethod
    def from_hf_state(cls, state: dict[str, torch.Tensor], prefix: str = "") -> "NF4Weight":
        """Rebuild the weight from checkpoint tensors (the inverse of to_hf_state); extra keys are ignored."""
        key = f"{prefix}.weight" if prefix else "weight"
        info_key = f"{key}.quant_state.bitsandbytes__nf4"
        if info_key not in state:
            fp4 = f"{key}.quant_state.bitsandbytes__fp4" in state
            hint = "it is FP4-quantized; only NF4 is supported" if fp4 else "is it a bitsandbytes 4-bit checkpoint?"
            raise MiniloraError(f"missing tensor '{info_key}' ({hint})")
        try:
            info = json.loads(bytes(state[info_key].cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MiniloraError(f"'{info_key}' is not valid JSON bytes ({e}); the checkpoint is corrupt") from None
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in info:
                raise MiniloraError(f"'{info_key}' lacks field '{field}'; the checkpoint is corrupt")
        if info["quant_type"] != "nf4":
            raise MiniloraError(f"'{info_key}': quant_type {info['quant_type']!r} is not supported (only 'nf4')")
        packed = _require(state, key)
        if packed.dtype != torch.uint8:
            raise MiniloraError(f"'{key}' is {packed.dtype}; only bnb_4bit_quant_storage=uint8 is supported")
        # bnb records the nested (double) quantization in the JSON; the tensors must agree with it, or the uint8
        # absmax codes would be read as scales (or fp32 scales as codes).
        double_quant = "nested_offset" in info
        if double_quant != (f"{key}.nested_absmax" in state):
            raise MiniloraError(f"'{info_key}' says double quantization is {'on' if double_quant else 'off'} but "
                                f"'{key}.nested_absmax' is {'missing' if double_quant else 'present'}; "
                                f"the checkpoint is corrupt")
        absmax_dtype = state.get(f"{key}.absmax", torch.empty(0)).dtype
        if f"{key}.absmax" in state and absmax_dtype != (torch.uint8 if double_quant else torch.float32):
            raise MiniloraError(f"'{key}.absmax' is {absmax_dtype}, expected "
                                f"{'uint8 codes (double quantization)' if double_quant else 'float32 scales'}")
        if double_quant and info.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
            raise MiniloraError(f"'{info_key}': nested_blocksize {info['nested_blocksize']} is unsupported (only 256)")
        dtype = getattr(torch, info["dtype"], None)
        if dtype not in _SUPPORTED_DTYPES:
            raise MiniloraError(f"'{info_key}': unsupported dtype {info['dtype']!r}")
        q = cls(
            packed=packed,
            absmax=_require(state, f"{key}.absmax"),
            nested_absmax=_require(state, f"{key}.nested_absmax") if double_quant else None,
            nested_quant_map=_require(state, f"{key}.nested_quant_map") if double_quant else None,
            offset=float(info["nested_offset"]) if double_quant else 0.0,
            quant_map=_require(state, f"{key}.quant_map"),
            shape=torch.Size(info["shape"]),
            dtype=dtype,
            blocksize=int(info["blocksize"]),
            double_quant=double_quant,
        )
        _check_sizes(q, where=key)
        return q


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "bfloat16", as bnb writes it


def _require(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise MiniloraError(f"missing tensor '{key}' in the 4-bit checkpoint")
    return state[key]


def _check_sizes(q: NF4Weight, where: str) -> None:
    """Catch truncated or mismatched tensors here rather than as an index error inside a kernel."""
    n_blocks = -(-q.numel // q.blocksize)
    expected = {"weight": (q.packed.numel(), (q.numel + 1) // 2), "absmax": (q.absmax.numel(), n_blocks)}
    if q.double_quant:
        expected["nested_absmax"] = (q.nested_absmax.numel(), -(-n_blocks // NESTED_BLOCKSIZE))
        expected["nested_quant_map"] = (q.nested_quant_map.numel(), 256)
    expected["quant_map"] = (q.quant_map.numel(), 16)
    for name, (got, want) in expected.items():
        if got != want:
            raise MiniloraError(f"'{where}': {name} has {got} values, expected {want} for shape {list(q.shape)}")


# --- quantize ----------------------------------------------------------------------------------------------------


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| per block of `blocksize` consecutive values; the last block may be partial. (n,) → (n_blocks,)"""
    n = flat.numel()
    padded = torch.nn.functional.pad(flat.abs(), (0, -n % blocksize))  # zeros never raise a max of |x|
    return padded.view(-1, blocksize).amax(dim=1)


def _quantize_4bit_codes(flat: torch.Tensor, blocksize: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 code index (0..15) per value and the fp32 absmax per block, rounding exactly as bnb does."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = _blockwise_absmax(flat, blocksize)  # (n_blocks,)
    # Full blocks: multiply by the fp32 reciprocal (clamped so an all-zero block gives 0 * 1e38 = 0, not NaN).
    head = flat[:full].view(-1, blocksize) * (1.0 / absmax[: full // blocksize].clamp(min=1e-38)).view(-1, 1)
    scaled = [head.reshape(-1)]
    if full < n:  # the partial last block: bnb divides here, and keeps the clamped absmax
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled.append(flat[full:] / absmax[-1])
    scaled = torch.cat(scaled).clamp(-1, 1)  # (n,)
    midpoints = (code[:-1] + code[1:]) / 2  # (15,) in fp32, as bnb computes them
    # bucketize(right=False) gives the number of midpoints < x: a value exactly on a midpoint keeps the lower code.
    return torch.bucketize(scaled, midpoints), absmax


def _dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """bnb's CPU lookup table: for 65536 evenly spaced points p on [-1, 1], the index of the code nearest to p."""
    i = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    points = -1.0 + (2.0 * i) / (_LUT_SIZE - 1)  # fp32, bnb's expression
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(midpoints, points, side="left")  # number of midpoints < p; ties keep the lower code


def _quantize_8bit_dynamic(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of fp32 `x` with the dynamic code → (uint8 codes, fp32 absmax per block)."""
    absmax = _blockwise_absmax(x, blocksize)  # (n_blocks,)
    inv = torch.where(absmax == 0, 0.0, 1.0 / absmax)  # an all-zero block must not make 0 * inf = NaN
    scaled = (x * inv.repeat_interleave(blocksize)[: x.numel()]).clamp(-1, 1)  # (n,)
    lut_index = ((scaled + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).long()  # truncation, as the C cast does
    codes = _dynamic_lut(code)[lut_index]
    block_is_zero = (absmax == 0).repeat_interleave(blocksize)[: x.numel()]
    codes = torch.where(block_is_zero, 0, codes)  # bnb writes code 0 for an all-zero block (its scale is 0 anyway)
    return codes.to(torch.uint8), absmax


QUANTIZE_CHUNK = 1 << 20  # a multiple of every supported blocksize


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float32/float16/bfloat16 tensor to NF4 (see the module docstring for the algorithm)."""
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise MiniloraError(f"quantize_nf4: weight dtype {weight.dtype} is not one of float32/float16/bfloat16")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise MiniloraError(f"quantize_nf4: blocksize {blocksize} must be a power of two from 32 to 4096 (as in bnb)")
    if weight.numel() == 0:
        raise MiniloraError("quantize_nf4: the weight is empty")
    weight = weight.detach()
    flat = weight.reshape(-1)  # (n,)
    quant_map = NF4_CODE.to(weight.device)
    # Quantize QUANTIZE_CHUNK values at a time: the fp32 copy, the scaled values and the int64 code indices cost
    # ~30 bytes per value, 0.3 GB for one 11 M-weight MLP matrix at once. Chunks are whole blocks and an even
    # number of values, so the result is the same bytes as one pass.
    packed_parts, absmax_parts = [], []
    for start in range(0, flat.numel(), QUANTIZE_CHUNK):
        piece = flat[start:start + QUANTIZE_CHUNK].float()  # bf16/fp16 → fp32 is exact
        codes, absmax = _quantize_4bit_codes(piece, blocksize, quant_map)  # (n,), (n_blocks,)
        codes = torch.nn.functional.pad(codes, (0, codes.numel() % 2), value=7)  # pad nibble = the code of 0.0
        codes = codes.to(torch.uint8).view(-1, 2)
        packed_parts.append((codes[:, 0] << 4) | codes[:, 1])  # first element in the high nibble
        absmax_parts.append(absmax)
    packed, absmax = torch.cat(packed_parts), torch.cat(absmax_parts)

    nested_absmax = nested_quant_map = None
    offset = 0.0
    if double_quant:
        offset_t = absmax.mean()  # the same fp32 reduction bnb calls, so the offset is bit-identical
        nested_quant_map = create_dynamic_map().to(weight.device)
        absmax, nested_absmax = _quantize_8bit_dynamic(absmax - offset_t, nested_quant_map, NESTED_BLOCKSIZE)
        offset = offset_t.item()
    return NF4Weight(
        packed=packed.view(-1, 1),
        absmax=absmax,
        nested_absmax=nested_absmax,
        nested_quant_map=nested_quant_map,
        offset=offset,
        quant_map=quant_map,
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
        double_quant=double_quant,
    )


# --- dequantize --------------------------------------------------------------------------------------------------


def _scale_blocks_(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] *= scales[i // blocksize] in fp32, in place when n is a multiple of blocksize. (n,) → (n,)"""
    n = values.numel()
    if n % blocksize:  # a partial last block: pad to whole blocks (a copy), scale, cut
        values = torch.nn.functional.pad(values, (0, -n % blocksize))
    return values.view(-1, blocksize).mul_(scales[:, None]).view(-1)[:n]  # via (n_blocks, blocksize)


def dequantize_absmax(q: NF4Weight) -> torch.Tensor:
    """The fp32 scale of each 64-block; with double quantization: code value * nested scale + offset."""
    if not q.double_quant:
        return q.absmax.float()
    codes = q.nested_quant_map.index_select(0, q.absmax.int())  # (n_blocks,) values of the 8-bit codes
    return _scale_blocks_(codes, q.nested_absmax, NESTED_BLOCKSIZE) + q.offset  # two fp32 roundings, as in bnb


DEQUANTIZE_CHUNK = 1 << 20  # values per pass on CPU for large weights (a multiple of every blocksize)


def _nf4_pair_table(quant_map: torch.Tensor) -> torch.Tensor:
    """For each of the 256 byte values, the NF4 values of its (high, low) nibbles as one int64. (256,)

    A gather from this table does the nibble unpack and the code lookup at once. The pair of fp32 is viewed as
    one int64 so the gather moves whole 8-byte rows: 1 ms instead of 7 for 4M weights on one core.
    """
    byte = torch.arange(256, device=quant_map.device)
    pairs = torch.stack([quant_map[byte >> 4], quant_map[byte & 0x0F]], dim=1)  # (256, 2) fp32
    return pairs.view(torch.int64).view(256)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight, shape q.shape, in `dtype` (default: the original dtype). Computed in fp32, then cast.

    A weight of up to DEQUANTIZE_CHUNK values (and any weight on a GPU) is done in one pass. A larger one on CPU
    goes a chunk at a time, each chunk written straight into the output, so the int32 indices and int64 gathers
    (6 bytes per weight; the fp32 values are the gathers reinterpreted) never exist for the whole matrix at once:
    one pass over a 16M-weight matrix was 2-3x slower on one core (113-130 ms instead of 41-61 to bf16, 4096x4096).
    """
    absmax = dequantize_absmax(q)  # (n_blocks,) fp32
    dtype = dtype or q.dtype
    if q.device.type != "cpu" or q.numel <= DEQUANTIZE_CHUNK:
        return _dequantize_span(q, absmax, 0, q.numel).view(q.shape).to(dtype)
    out = torch.empty(q.numel, dtype=dtype)  # (n,)
    for start in range(0, q.numel, DEQUANTIZE_CHUNK):
        stop = min(start + DEQUANTIZE_CHUNK, q.numel)
        out[start:stop] = _dequantize_span(q, absmax, start, stop)  # fp32 → out's dtype
    return out.view(q.shape)


def _dequantize_span(q: NF4Weight, absmax: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Weights start..stop-1 of the flattened matrix in fp32 (start a multiple of the blocksize, so even)."""
    packed = q.packed.view(-1)[start // 2 : (stop + 1) // 2]  # element 2i in the high nibble of byte i
    pairs = q.pair_table.index_select(0, packed.int())  # (bytes,) int64 = two fp32 NF4 values each
    values = pairs.view(torch.float32)[: stop - start]  # (stop - start,) in [-1, 1]
    scales = absmax[start // q.blocksize : -(-stop // q.blocksize)]  # the blocks this span covers
    return _scale_blocks_(values, scales, q.blocksize)
