"""NF4Tensor: FSDP2's row ops on a 4-bit weight give exactly the bytes one process holds, and gather back whole.

FSDP2 itself (2 gloo processes) is exercised in tests/test_distributed.py; here the ops it calls, one by one.
"""

import pytest
import torch
import torch.nn as nn

from minilora.errors import MiniloraError
from minilora.quant import NF4Linear, dequantize_nf4, quantize_nf4
from minilora.quant.nf4_tensor import NF4Tensor, shardable, to_shardable_nf4


def weight(shape=(96, 128), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("double_quant", [True, False])
def test_row_shards_gather_back_to_the_same_weight(world, double_quant):
    q = quantize_nf4(weight(), double_quant=double_quant)
    t = NF4Tensor.from_weight(q)
    shards = torch.chunk(t, world, dim=0)  # what fully_shard does first
    assert [tuple(s.shape) for s in shards] == [(96 // world, 128)] * world
    # The padded shard FSDP2 builds: new_zeros, then narrow(...).copy_(shard)
    local = [s.new_zeros(s.shape) for s in shards]
    for dst, src in zip(local, shards):
        dst.narrow(0, 0, src.shape[0]).copy_(src)
    inputs = [x.fsdp_pre_all_gather(None, t.shape, t.stride(), None, None)[0] for x in local]
    gathered = [torch.cat([i[k] for i in inputs]) for k in range(2)]  # all-gather in rank order
    whole, inner = local[0].fsdp_post_all_gather(gathered, None, torch.float32)
    assert torch.equal(dequantize_nf4(whole.nf4_weight()), dequantize_nf4(q))
    assert whole.nf4_weight().packed.data_ptr() == inner[0].data_ptr()  # FSDP2's buffer, not a copy


def test_a_shard_is_the_bytes_of_quantizing_its_rows_alone():
    """Without double quantization a block's code depends only on its values: shard r is quantize_nf4(rows)."""
    w = weight()
    t = NF4Tensor.from_weight(quantize_nf4(w, double_quant=False))
    for r, shard in enumerate(torch.chunk(t, 2, dim=0)):
        alone = quantize_nf4(w[48 * r:48 * (r + 1)], double_quant=False)
        assert torch.equal(shard.packed, alone.packed.view(-1)) and torch.equal(shard.absmax, alone.absmax)


def test_cuts_inside_a_block_are_refused():
    t = NF4Tensor.from_weight(quantize_nf4(weight((6, 96))))  # 96 values per row: row 1 starts mid-block
    assert not shardable(torch.Size((6, 96)), 64, 6) and shardable(torch.Size((6, 96)), 64, 3)
    with pytest.raises(MiniloraError, match="cut a quantization block"):
        torch.chunk(t, 6, dim=0)
    with pytest.raises(MiniloraError, match="cannot be dequantized on its own"):
        torch.chunk(t, 3, dim=0)[1].nf4_weight()
    with pytest.raises(NotImplementedError, match="add"):
        t + 1


def test_nf4linear_with_an_nf4tensor_parameter_computes_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32))
    x = torch.randn(3, 128)
    before = model(x)
    assert to_shardable_nf4(model, world_size=2) == 0
    assert isinstance(model[0].weight, nn.Parameter) and isinstance(model[0].weight, NF4Tensor)
    assert not model[0].weight.requires_grad
    assert torch.equal(model(x), before)
    model.to("cpu")  # Module.to passes through the subclass's _to_copy
    assert torch.equal(model(x), before)
