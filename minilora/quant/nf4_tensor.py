"""NF4Tensor: a 4-bit NF4 weight as a torch.Tensor subclass, so FSDP2 can shard QLoRA's frozen base.

FSDP2's `fully_shard` only shards nn.Parameters, and an NF4Weight (nf4.py) is a plain dataclass: every rank would
keep the whole 4-bit base. Wrapped here, the weight looks like a (out_features, in_features) tensor of its original
dtype while it stores only the NF4 bytes:

    packed   uint8 (values / 2,)   two 4-bit codes per byte, row-major (nf4.py)       ─┐ cut along rows into
    absmax   (values / blocksize,) one scale (or 8-bit scale code) per block of 64    ─┘ the ranks' shards
    tables   nested_absmax, the code tables, offset: tiny (1 fp32 per 16384 weights), kept whole on every rank

How FSDP2 uses it (torch/distributed/fsdp/_fully_shard/_fsdp_param.py; torchao's NF4Tensor follows the same
protocol):
    sharding        torch.chunk(weight, N, dim=0) → aten.split; then new_zeros / narrow (aten.slice) / copy_ to
                    build the (padded) local shard, view(-1), as_strided, detach: each op maps to the same rows
                    of `packed` and `absmax`. A row range is only cut where it starts on a whole block (and byte),
                    so the shards are exactly the bytes one process would hold for those rows.
    forward         fsdp_pre_all_gather gives FSDP the shard's (packed, absmax); FSDP all-gathers them in rank
                    order (which is row order); fsdp_post_all_gather wraps the gathered bytes, with the tables, as the
                    whole NF4Tensor the layer dequantizes. Its byte tensors ARE FSDP's all-gather buffers, so
                    FSDP's freeing and re-gathering of those buffers (after forward, before backward) just works.

Only the row-range ops FSDP2 needs are implemented; anything else (arithmetic, transposes) raises, naming the op.
Sharding needs out_features divisible by N (FSDP2 pads uneven shards, which NF4 bytes cannot express) and
out_features / N × in_features a multiple of the block size; to_shardable_nf4 leaves other weights whole.

Loading is rank-local (quantize_shard): under FSDP2 each rank reads only its rows of each block linear from the
safetensors file and quantizes them, so neither the float weights nor the whole 4-bit base ever exist in one
process (the embeddings, norms and head are read whole, then sharded).

Not handled: rank-local loading of an already 4-bit (bitsandbytes) checkpoint, which is read whole then sharded;
state_dict() of a sharded 4-bit model (checkpoints hold the adapter, gathered; the base is the original's).
"""

from dataclasses import replace

import torch
import torch.nn as nn

from ..errors import MiniloraError
from .nf4 import NF4Weight

aten = torch.ops.aten


class NF4Tensor(torch.Tensor):
    """Rows of an NF4 weight (all of them, or one rank's shard) as a tensor FSDP2 can cut, gather and move."""

    @staticmethod
    def __new__(cls, packed: torch.Tensor, absmax: torch.Tensor, shape, template: NF4Weight, held=None):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=template.dtype,
                                                   device=packed.device, requires_grad=False)

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, template: NF4Weight, held=None):
        self.packed = packed  # uint8 (ceil(numel / 2),) these rows' codes
        self.absmax = absmax  # (ceil(numel / blocksize),) these rows' block scales
        self.template = template  # the whole weight's NF4Weight fields; its packed/absmax are not used
        # Rank-local loading (quantize_shard): a tensor of the whole shape that holds only rows
        # held = (first, count) of it: FSDP2's chunk of those rows is real, the other ranks' chunks are empty.
        self.held = (0, self.shape[0]) if held is None else held
        self._weight = None  # the NF4Weight of a whole tensor, built on first use

    @classmethod
    def from_weight(cls, q: NF4Weight) -> "NF4Tensor":
        # The template drops the big tensors (fresh empty ones: a [:0] view would keep the whole storage alive)
        template = replace(q, packed=q.packed.new_empty(0), absmax=q.absmax.new_empty(0))
        return cls(q.packed.view(-1), q.absmax, q.shape, template)

    # --- what NF4Linear reads ---------------------------------------------------------------------------------
    def nf4_weight(self) -> NF4Weight:
        """The NF4Weight the layer dequantizes (only for the whole tensor: after FSDP2's all-gather)."""
        if self.shape != self.template.shape or self.held != (0, self.shape[0]):
            raise MiniloraError(f"NF4Tensor: a shard {tuple(self.shape)} of a {tuple(self.template.shape)} weight "
                                "cannot be dequantized on its own; FSDP2 gathers it before the forward")
        if self._weight is None:
            self._weight = replace(self.template, packed=self.packed.view(-1, 1), absmax=self.absmax)
        return self._weight

    @property
    def local_nbytes(self) -> int:
        """Bytes of memory behind these rows' codes and block scales (their storages, measured, so a shard that
        still pinned the whole weight would show it); the small tables, kept whole everywhere, aside."""
        return self.packed.untyped_storage().nbytes() + self.absmax.untyped_storage().nbytes()

    def __repr__(self) -> str:
        return f"NF4Tensor(shape={tuple(self.shape)}, of={tuple(self.template.shape)}, device={self.packed.device})"

    # --- torch.compile / DTensor plumbing: which inner tensors this subclass holds --------------------------
    def __tensor_flatten__(self):
        return ["packed", "absmax"], (tuple(self.shape), self.template, self.held)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        shape, template, held = meta
        return NF4Tensor(inner["packed"], inner["absmax"], shape, template, held)

    # --- rows <-> bytes -----------------------------------------------------------------------------------------
    def _row_values(self) -> int:
        return self.shape[1:].numel()  # values per row (in_features); 1 for a flattened view

    def rows(self, start: int, stop: int) -> "NF4Tensor":
        """Rows start..stop-1 as an NF4Tensor sharing this one's bytes; start must begin a block."""
        stop = min(stop, self.shape[0])
        start = min(start, stop)
        per_row, bs = self._row_values(), self.template.blocksize
        first_held, n_held = self.held
        if not (first_held <= start and stop <= first_held + n_held):  # another rank's rows: shape only
            if first_held < stop and start < first_held + n_held:
                raise MiniloraError(f"NF4Tensor: rows {start}..{stop} straddle the rows this rank holds "
                                    f"({first_held}..{first_held + n_held})")
            return NF4Tensor(self.packed[:0], self.absmax[:0], (stop - start, *self.shape[1:]), self.template,
                             held=(0, 0))
        first, last = (start - first_held) * per_row, (stop - first_held) * per_row  # flat value range, held rows
        if first % bs:
            raise MiniloraError(f"NF4Tensor: a shard starting at row {start} (value {first}) would cut a "
                                f"quantization block of {bs}; rows × in_features must be a multiple of {bs}")
        packed = self.packed[first // 2:(last + 1) // 2]
        absmax = self.absmax[first // bs:-(-last // bs)]
        return NF4Tensor(packed, absmax, (stop - start, *self.shape[1:]), self.template)

    def _same_bytes(self, shape=None, fn=lambda t: t) -> "NF4Tensor":
        if shape is not None and shape != self.shape and self.held != (0, self.shape[0]):
            raise MiniloraError("NF4Tensor: a tensor holding only some rows cannot be reshaped")
        held = self.held if shape is None or shape == self.shape else None
        return NF4Tensor(fn(self.packed), fn(self.absmax), self.shape if shape is None else shape, self.template,
                         held)

    # --- FSDP2's all-gather extension ---------------------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """What FSDP2 all-gathers for this shard: its bytes, never a dequantized copy (4.127 bits per weight)."""
        return (self.packed, self.absmax), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """The whole weight from the gathered (packed, absmax) of every rank, concatenated in rank = row order."""
        packed, absmax = all_gather_outputs
        if out is not None:  # FSDP2 re-gathered into the same buffers `out` already wraps: nothing to rebuild
            return
        whole = NF4Tensor(packed, absmax, self.template.shape, self.template)
        return whole, (packed, absmax)

    # --- the aten ops FSDP2 and Module.to use -------------------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket
        t = args[0]
        if op in (aten.detach, aten.alias):
            return t._same_bytes()
        if op is aten.split:  # torch.chunk(weight, N, dim=0)
            size, dim = args[1], (args[2] if len(args) > 2 else kwargs.get("dim", 0))
            _rows_only(func, dim)
            return [t.rows(i, i + size) for i in range(0, t.shape[0], size)]
        if op is aten.slice:  # narrow(dim=0, start, length)
            dim, start, stop = (list(args[1:4]) + [0, 0, None])[:3] if len(args) > 1 else (0, 0, None)
            step = args[4] if len(args) > 4 else 1
            _rows_only(func, dim)
            if step != 1:
                raise MiniloraError("NF4Tensor: strided row slices are not supported")
            return t.rows(start or 0, t.shape[0] if stop is None else stop)
        if op is aten.new_zeros:  # the padded shard FSDP2 copies a shard into
            shape = torch.Size(args[1])
            if shape[1:] != t.shape[1:]:
                raise MiniloraError(f"NF4Tensor.new_zeros{tuple(shape)}: only whole rows of {tuple(t.shape[1:])}")
            n = shape.numel()
            device = kwargs.get("device") or t.packed.device
            packed = torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device)
            absmax = torch.zeros(-(-n // t.template.blocksize), dtype=t.absmax.dtype, device=device)
            return NF4Tensor(packed, absmax, shape, t.template)
        if op is aten.copy_:
            src = args[1]
            if not isinstance(src, NF4Tensor) or src.shape != t.shape:
                raise MiniloraError("NF4Tensor.copy_: the source must be an NF4Tensor of the same rows")
            t.packed.copy_(src.packed)
            t.absmax.copy_(src.absmax)
            return t
        if op in (aten.view, aten._unsafe_view, aten.reshape):
            shape = torch.Size(_infer(args[1], t.numel()))
            return t._same_bytes(shape)
        if op is aten.as_strided:
            size, offset = torch.Size(args[1]), (args[3] if len(args) > 3 else 0)
            if size != t.shape or offset:
                raise MiniloraError(f"NF4Tensor.as_strided: only the identity view is supported, got {tuple(size)}")
            return t._same_bytes()
        if op is aten._to_copy:  # .to(device): the bytes move; every dtype of the format stays as it is
            device = kwargs.get("device") or t.packed.device
            template = t.template.to(device)
            return NF4Tensor(t.packed.to(device), t.absmax.to(device), t.shape, template, t.held)
        if op is aten.clone:
            return t._same_bytes(fn=torch.clone)
        if op is aten.is_pinned:
            return t.packed.is_pinned()
        if op is aten.is_same_size:
            return t.shape == args[1].shape
        raise NotImplementedError(f"NF4Tensor does not support {func} (only the row ops FSDP2 uses)")


def _rows_only(func, dim: int) -> None:
    if dim != 0:
        raise MiniloraError(f"NF4Tensor: {func} along dim {dim}: only whole rows (dim 0) can be cut")


def _infer(shape, numel: int) -> list[int]:
    shape = list(shape)
    if -1 in shape:
        known = 1
        for s in shape:
            known *= s if s != -1 else 1
        shape[shape.index(-1)] = numel // known
    return shape


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
def shardable(shape: torch.Size, blocksize: int, world_size: int) -> bool:
    """Can FSDP2's row shards of a (out, in) weight each start on a whole quantization block?"""
    out_features, in_features = shape
    return out_features % world_size == 0 and (out_features // world_size * in_features) % blocksize == 0


def to_shardable_nf4(model: nn.Module, world_size: int) -> int:
    """Make each NF4Linear's weight an NF4Tensor parameter (frozen) FSDP2 will shard; return how many stay whole
    (NF4Weight, unseen by FSDP2) because their shards would cut a quantization block."""
    from .nf4_linear import NF4Linear

    kept = 0
    for module in model.modules():
        if isinstance(module, NF4Linear) and not isinstance(module.weight, nn.Parameter):
            q = module.weight  # an NF4Weight, or an NF4Tensor of this rank's rows (quantize_shard)
            if isinstance(q, NF4Weight) and not shardable(q.shape, q.blocksize, world_size):
                kept += 1
                continue
            t = NF4Tensor.from_weight(q) if isinstance(q, NF4Weight) else q
            del module.weight  # a plain attribute until now (see NF4Linear)
            module.register_parameter("weight", nn.Parameter(t, requires_grad=False))
    return kept


def quantize_shard(reader_slice, shape, dtype: torch.dtype, blocksize: int, device, rank: int, world_size: int):
    """Rank-local loading: read and quantize only this rank's rows of a weight; the result is bit-identical to
    those rows of quantize_nf4(whole weight). A collective: every rank calls it for the same weights in turn.

    The 4-bit codes and fp32 block scales of whole blocks depend on those blocks alone. Double quantization
    needs the whole weight's scales (their mean is the offset; they are 8-bit coded in groups of 256): the ranks
    all-gather their fp32 scales (4 bytes per 64 weights), and every rank codes them all and keeps its part.
    A weight whose rows cannot be cut on block boundaries is read and quantized whole (an NF4Weight).

    reader_slice: safetensors' get_slice(name) (rows are read without the rest); shape: the whole (out, in).
    """
    import torch.distributed as dist

    from .nf4 import NESTED_BLOCKSIZE, _quantize_8bit_dynamic, create_dynamic_map, quantize_nf4

    shape = torch.Size(shape)
    if not shardable(shape, blocksize, world_size):
        return quantize_nf4(reader_slice[:].to(device=device, dtype=dtype), blocksize, double_quant=True)
    n_rows = shape[0] // world_size
    first = rank * n_rows
    rows = reader_slice[first:first + n_rows].to(device=device, dtype=dtype)  # (n_rows, in): 1/N of the weight
    q = quantize_nf4(rows, blocksize, double_quant=False)  # codes + fp32 scales of these rows' whole blocks
    del rows
    scales = [torch.empty_like(q.absmax) for _ in range(world_size)]
    dist.all_gather(scales, q.absmax)
    absmax = torch.cat(scales)  # (n_blocks,) fp32, the whole weight's scales in row order
    offset = absmax.mean()  # the same fp32 reduction quantize_nf4 does on the whole weight
    code = create_dynamic_map().to(device)
    codes, nested_absmax = _quantize_8bit_dynamic(absmax - offset, code, NESTED_BLOCKSIZE)
    template = NF4Weight(packed=q.packed.new_empty(0), absmax=codes.new_empty(0), nested_absmax=nested_absmax,
                         nested_quant_map=code, offset=offset.item(), quant_map=q.quant_map, shape=shape,
                         dtype=dtype, blocksize=blocksize, double_quant=True)
    mine = codes[rank * q.absmax.numel():(rank + 1) * q.absmax.numel()].clone()
    return NF4Tensor(q.packed.view(-1), mine, shape, template, held=(first, n_rows))


def shard_summary(model: nn.Module) -> tuple[int, int]:
    """(bytes of 4-bit codes and block scales this rank holds, bytes of the whole base): the sharded part of
    QLoRA's base. Weights kept whole count fully on every rank; the replicated code tables (1 KB per weight) and
    the nested scales (4 bytes per 16384 weights) are left out of both."""
    from .nf4_linear import NF4Linear

    local = whole = 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            q = module.nf4 if isinstance(module.weight, NF4Weight) else module.weight.to_local().template
            size = (q.numel + 1) // 2 + -(-q.numel // q.blocksize) * q.absmax.element_size()
            whole += size
            w = module.weight
            local += size if isinstance(w, NF4Weight) else w.to_local().local_nbytes
    return local, whole
