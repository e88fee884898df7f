"""minilora.quant.nf4 against bitsandbytes 0.50 (the oracle), bit for bit, and against transformers' 4-bit checkpoints."""

import json

import pytest
import torch

from minilora.errors import MiniloraError
from minilora.quant.nf4 import NF4_CODE, NF4Weight, create_dynamic_map, dequantize_absmax, dequantize_nf4, quantize_nf4
from minilora.quant.nf4 import _quantize_8bit_dynamic

bnb_F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [
    (1, 1),  # one weight: a single partial block, its centred absmax is exactly 0
    (3, 5),  # odd numel: a padding nibble
    (7, 129),  # blocks straddle rows, partial last block
    (64, 64),  # exactly 64 blocks
    (300, 257),  # 1205 blocks: several nested blocks of 256, the last one partial
    (2, 3, 4),  # not 2-D
    (4096, 33),  # 2112 blocks
]


def _random_weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3  # rows of different magnitude
    return (torch.randn(shape, generator=g) * rows).to(dtype)


def _bnb(w, double_quant, blocksize=64):
    # bnb's CPU dequantize of odd shapes goes through torch.compile; eager gives the same numbers and is ~3x faster.
    with torch._dynamo.config.patch(disable=True):
        return bnb_F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def _bnb_dequantize(packed, state, dtype):
    state.dtype = dtype
    with torch._dynamo.config.patch(disable=True):
        return bnb_F.dequantize_4bit(packed, state)


def assert_same_as_bnb(w, double_quant, blocksize=64):
    packed, state = _bnb(w, double_quant, blocksize)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.quant_map, state.code)
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_quant_map, state.state2.code)
        assert q.offset == state.offset.item()
    for dtype in DTYPES:  # dequantized: identical in every output dtype, not just close
        ours = dequantize_nf4(q, dtype)
        assert ours.shape == w.shape  # (bnb returns a 1-D weight as (1, n); the values are what we compare)
        assert torch.equal(ours, _bnb_dequantize(packed, state, dtype).view(w.shape))
    return q


def test_code_tables_equal_bnb():
    assert torch.equal(NF4_CODE, bnb_F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(create_dynamic_map(), bnb_F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_dequantize_bit_identical_to_bnb(shape, dtype, double_quant):
    q = assert_same_as_bnb(_random_weight(shape, dtype), double_quant)
    assert q.shape == torch.Size(shape) and q.dtype == dtype
    assert q.packed.shape == ((q.numel + 1) // 2, 1)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_other_blocksizes_bit_identical_to_bnb(blocksize):
    assert_same_as_bnb(_random_weight((37, 300), torch.bfloat16), double_quant=True, blocksize=blocksize)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_at_midpoints_and_zero_blocks(dtype):
    # Block 0: absmax 1 and every midpoint between NF4 codes (exactly representable after the cast, times
    # 1/absmax = 1), so each value sits on a tie; bnb keeps the lower code.
    mids = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(dtype).float()
    block0 = torch.cat([torch.tensor([1.0]), mids, -mids, torch.zeros(64 - 31)])
    zeros = torch.zeros(64)  # an all-zero block: absmax 0, all codes "0.0"
    halves = torch.full((64,), 0.5)  # one value repeated: every weight is its own absmax
    tail_zero = torch.zeros(10)  # an all-zero partial block (bnb stores its absmax clamped to 1e-38)
    w = torch.cat([block0, zeros, halves, tail_zero]).to(dtype)
    q = assert_same_as_bnb(w, double_quant=False)
    codes = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], 1).view(-1)
    if dtype == torch.float32:  # (16-bit casts move the values off the midpoints; bnb equality still holds)
        assert codes[1:16].tolist() == list(range(15))  # midpoint i → code i, the lower neighbour
        assert codes[16:31].tolist() == list(range(14, -1, -1))  # -midpoint i → lower code too (14 - i)
    assert (codes[64:128] == 7).all()  # zero block → the code of 0.0
    assert q.absmax[1] == 0 and q.absmax[3] == 1e-38
    assert_same_as_bnb(w, double_quant=True)


def test_nested_rounding_matches_bnb_lookup_table():
    # The 8-bit rounding of the centred absmax is bnb's 65536-point table, not an exact nearest search. Values
    # spread over 7 decades hit the densely spaced codes near 0 where the two rules differ.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256 * 300, generator=g) * 10.0 ** torch.randint(-6, 1, (256 * 300,), generator=g).float()
    x[5 * 256 : 6 * 256] = 0.0  # an all-zero nested block
    q, state = bnb_F.quantize_blockwise(x, blocksize=256)
    codes, absmax = _quantize_8bit_dynamic(x, create_dynamic_map(), 256)
    assert torch.equal(codes, q) and torch.equal(absmax, state.absmax)
    nearest = torch.bucketize(x / absmax.repeat_interleave(256).clamp(min=1e-38), _midpoints(create_dynamic_map()))
    assert (nearest != codes.long()).float().mean() > 0.05  # the difference is real, not a corner case


def _midpoints(code):
    return (code[:-1] + code[1:]) / 2


def test_dequantize_absmax_formula():
    q = quantize_nf4(_random_weight((128, 256), torch.float32))
    absmax = q.nested_quant_map[q.absmax.long()] * q.nested_absmax[torch.arange(q.absmax.numel()) // 256] + q.offset
    assert torch.equal(dequantize_absmax(q), absmax)
    fp32 = quantize_nf4(_random_weight((128, 256), torch.float32), double_quant=False)
    # The centred absmax, divided by its block-of-256 scale, lies in [-1, 1]; rounding it to the dynamic code costs
    # at most half the widest gap between codes (near ±1), plus one step of bnb's 65536-point table.
    gap = create_dynamic_map().diff().max()  # 0.0141
    bound = (gap / 2 + 2 / 65535) * q.nested_absmax.repeat_interleave(256)[: q.absmax.numel()]
    assert ((dequantize_absmax(q) - fp32.absmax).abs() <= bound).all()


def test_bits_per_parameter_matches_qlora_accounting():
    q = quantize_nf4(torch.randn(1024, 1024))
    # 4 bits + 8 bits per 64 + 32 bits per 64*256 (+ the 32-bit offset, negligible): the paper's 4.127
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / 1024**2
    assert q.bits_per_parameter == pytest.approx(expected, rel=1e-12)
    assert round(q.bits_per_parameter, 3) == 4.127
    assert q.nbytes == 1024 * 1024 // 2 + 1024 * 1024 // 64 + 4 * 64 + 4
    no_dq = quantize_nf4(torch.randn(4096, 64), double_quant=False)
    assert no_dq.bits_per_parameter == 4.5


def test_to_device_keeps_dtypes():
    q = quantize_nf4(torch.randn(10, 70))
    q2 = q.to("cpu")
    assert q2.absmax.dtype == torch.uint8 and q2.nested_absmax.dtype == torch.float32
    assert q2.device == torch.device("cpu")
    assert torch.equal(dequantize_nf4(q2), dequantize_nf4(q))


def test_rejects_bad_input():
    with pytest.raises(MiniloraError, match="dtype"):
        quantize_nf4(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(MiniloraError, match="blocksize"):
        quantize_nf4(torch.zeros(4, 4), blocksize=48)
    with pytest.raises(MiniloraError, match="empty"):
        quantize_nf4(torch.zeros(0, 4))


# --- Hugging Face checkpoint tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_hf_state_equals_bnb_quant_state_as_dict(double_quant):
    w = _random_weight((48, 80), torch.bfloat16)
    packed, state = _bnb(w, double_quant)
    expected = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = quantize_nf4(w, double_quant=double_quant).to_hf_state()
    assert ours.keys() == expected.keys()
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key
    back = NF4Weight.from_hf_state(ours)
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(quantize_nf4(w, double_quant=double_quant)))


@pytest.fixture(scope="module")
def transformers_4bit_checkpoint(tmp_path_factory):
    """A one-layer Llama saved in bf16, loaded by transformers with NF4 + double quant, saved again in 4-bit."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf4bit")
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "bf16")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM.from_pretrained(
        root / "bf16", quantization_config=bnb_config, dtype=torch.bfloat16, device_map="cpu"
    )
    model.save_pretrained(root / "nf4")
    return load_file(root / "bf16" / "model.safetensors"), load_file(root / "nf4" / "model.safetensors")


def test_hf_state_equals_transformers_saved_checkpoint(transformers_4bit_checkpoint):
    original, saved = transformers_4bit_checkpoint
    prefixes = sorted({k.split(".weight")[0] for k in saved if k.endswith("quant_state.bitsandbytes__nf4")})
    assert len(prefixes) == 7  # q, k, v, o, gate, up, down
    for prefix in prefixes:
        q = quantize_nf4(original[f"{prefix}.weight"])
        ours = q.to_hf_state(prefix)
        theirs = {k: v for k, v in saved.items() if k.startswith(prefix + ".weight")}
        assert ours.keys() == theirs.keys()
        for key in theirs:  # including the JSON bytes of the quant state
            assert torch.equal(ours[key], theirs[key]), key
        info = json.loads(bytes(theirs[f"{prefix}.weight.quant_state.bitsandbytes__nf4"].tolist()))
        assert info["dtype"] == "bfloat16" and info["nested_offset"] == q.offset
        loaded = NF4Weight.from_hf_state(saved, prefix)
        assert torch.equal(dequantize_nf4(loaded), dequantize_nf4(q))


def test_from_hf_state_errors():
    state = quantize_nf4(torch.randn(8, 64)).to_hf_state("m")
    with pytest.raises(MiniloraError, match="missing tensor 'x.weight.quant_state"):
        NF4Weight.from_hf_state(state, "x")
    fp4 = dict(state)
    fp4["m.weight.quant_state.bitsandbytes__fp4"] = fp4.pop("m.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(MiniloraError, match="FP4"):
        NF4Weight.from_hf_state(fp4, "m")
    corrupt = dict(state, **{"m.weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)})
    with pytest.raises(MiniloraError, match="corrupt"):
        NF4Weight.from_hf_state(corrupt, "m")
    truncated = dict(state, **{"m.weight.absmax": state["m.weight.absmax"][:-1]})
    with pytest.raises(MiniloraError, match="absmax has 7 values, expected 8"):
        NF4Weight.from_hf_state(truncated, "m")
    missing = {k: v for k, v in state.items() if k != "m.weight.nested_quant_map"}
    with pytest.raises(MiniloraError, match="nested_quant_map"):
        NF4Weight.from_hf_state(missing, "m")
    # The JSON says double quantization but the nested tensors are gone: the uint8 codes must not be read as scales.
    no_nested = {k: v for k, v in state.items() if ".nested_" not in k}
    with pytest.raises(MiniloraError, match="double quantization is on but 'm.weight.nested_absmax' is missing"):
        NF4Weight.from_hf_state(no_nested, "m")
    plain = quantize_nf4(torch.randn(8, 64), double_quant=False).to_hf_state("m")
    codes_as_scales = dict(plain, **{"m.weight.absmax": torch.zeros(8, dtype=torch.uint8)})
    with pytest.raises(MiniloraError, match="expected float32 scales"):
        NF4Weight.from_hf_state(codes_as_scales, "m")


@pytest.mark.parametrize("blocksize", [64, 4096])
def test_large_weight_is_quantized_and_dequantized_in_chunks_with_the_same_bytes(monkeypatch, blocksize):
    # quantize_nf4 and dequantize_nf4 work through a chunk of values at a time to bound their temporaries; with
    # small chunks a (257, 300) weight spans many chunks and ends in a partial block (and with blocksize 4096 a
    # chunk is a single block), and must still equal bnb byte for byte, and value for value once dequantized.
    import minilora.quant.nf4 as nf4

    monkeypatch.setattr(nf4, "QUANTIZE_CHUNK", 4096)
    monkeypatch.setattr(nf4, "DEQUANTIZE_CHUNK", 4096)
    assert_same_as_bnb(_random_weight((257, 300), torch.bfloat16), double_quant=True, blocksize=blocksize)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_on_cuda_equals_bnb_on_cuda(dtype):
    # The CPU tests above match bitsandbytes' CPU kernels. On a GPU both sides run other code: ours the same tensor
    # ops on CUDA, bnb its CUDA kernels, whose 8-bit absmax quantizer searches the dynamic code instead of using the
    # CPU's 65536-point table (see minilora/nf4.py). This compares the two on the GPU, absmax codes included; the
    # dequantized weights must be identical wherever the codes are.
    w = _random_weight((4096, 1024), dtype).cuda()
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(w)
    assert torch.equal(q.packed, packed)
    assert q.offset == state.offset.item()
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    differing = (q.absmax != state.absmax).float().mean().item()
    assert differing == 0.0, f"{differing:.3%} of the absmax codes differ from bnb's CUDA path"
    assert torch.equal(dequantize_nf4(q), bnb_F.dequantize_4bit(packed, state).view(w.shape))
