"""NF4Linear: the frozen 4-bit base layer, against dequantize + F.linear and against bitsandbytes.matmul_4bit."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minilora import cpu_matmul
from minilora.cpu_matmul import LinearFunction, uses_onednn
from minilora.errors import MiniloraError
from minilora.quant.nf4 import dequantize_nf4, quantize_nf4
from minilora.quant.nf4_linear import NF4Linear

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_triton = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()), reason="the Triton backend needs a GPU or TRITON_INTERPRET=1"
)


def _linear(in_features, out_features, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


class TinyLoRA(nn.Module):
    """y = base(x) + (alpha / r) · (x Aᵀ) Bᵀ — enough LoRA to check gradients reach A and B through NF4Linear."""

    def __init__(self, base, r=4, alpha=8):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.1)  # non-zero so both get gradients

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_A.t()) @ self.lora_B.t()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_torch_backend_equals_dequantize_then_linear(dtype, bias):
    layer = NF4Linear.from_linear(_linear(130, 33, bias, dtype), backend="torch")
    x = _x(2, 5, 130, dtype=dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    b = None if layer.bias is None else layer.bias
    # Training multiplies as the model's own Linear does (oneDNN for float32 on the CPU, F.linear otherwise)
    y_ref = LinearFunction.apply(x_ref, dequantize_nf4(layer.weight, dtype), b)
    assert torch.equal(y, y_ref)
    gy = _x(2, 5, 33, dtype=dtype, seed=2)
    y.backward(gy)
    y_ref.backward(gy)
    assert torch.equal(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())  # frozen: no gradient to W or b
    with torch.no_grad():  # evaluation: exactly F.linear
        assert torch.equal(layer(x), F.linear(x, dequantize_nf4(layer.weight, dtype), b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7])  # one token (bnb's inference path when no grad) and a batch
def test_torch_backend_equals_bnb_matmul_4bit(dtype, M):
    # bnb 0.50 on CPU dequantizes to x's dtype and calls F.linear, and its backward multiplies by the dequantized
    # weight again — the same operations, so without oneDNN the outputs and input gradients are bit-identical
    # (tolerance 0). In float32 training minilora multiplies through oneDNN (cpu_matmul.py): the same products
    # summed in another order, ~1e-6 relative.
    bnb = pytest.importorskip("bitsandbytes")
    linear = _linear(128, 48, True, dtype)
    layer = NF4Linear.from_linear(linear, backend="torch")
    packed, state = bnb.functional.quantize_4bit(linear.weight.data, quant_type="nf4", compress_statistics=True)
    x = _x(M, 128, dtype=dtype).requires_grad_()
    x_bnb = x.detach().clone().requires_grad_()
    y = layer(x)
    y_bnb = bnb.matmul_4bit(x_bnb, packed.t(), state, bias=linear.bias.detach())
    tol = dict(rtol=0, atol=0) if not uses_onednn(x, linear.weight) else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_bnb, **tol)
    gy = _x(M, 48, dtype=dtype, seed=2)
    y.backward(gy)
    y_bnb.backward(gy)
    torch.testing.assert_close(x.grad, x_bnb.grad, **tol)
    with torch.no_grad():
        assert torch.equal(layer(x), bnb.matmul_4bit(x.detach(), packed.t(), state, bias=linear.bias.detach()))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16 tl.dot is broken in the interpreter
@pytest.mark.parametrize("M", [1, 9])
def test_triton_backend_matches_torch_backend(dtype, M):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    linear = _linear(128, 40, True, dtype)
    fused = NF4Linear.from_linear(linear, backend="triton").to(device)
    ref = NF4Linear.from_linear(linear, backend="torch").to(device)
    x = _x(M, 128, dtype=dtype).to(device).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = fused(x), ref(x_ref)
    gy = _x(M, 40, dtype=dtype, seed=2).to(device)
    y.backward(gy)
    y_ref.backward(gy)
    # Same rounded weights, different summation order: differences of a few output ulps (see test_kernels.py).
    tol = {torch.float32: 1e-5, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)


def test_auto_backend_uses_torch_on_cpu(monkeypatch):
    import minilora.kernels.nf4_matmul as mm

    monkeypatch.setattr(mm, "nf4_matmul", lambda *a: (_ for _ in ()).throw(AssertionError("triton on CPU")))
    layer = NF4Linear.from_linear(_linear(64, 8))
    assert layer.backend == "auto"
    layer(_x(3, 64))
    with pytest.raises(MiniloraError, match="backend"):
        NF4Linear.from_linear(_linear(64, 8), backend="cuda")


def test_compute_dtype_and_output_dtype():
    linear = _linear(64, 16, True, torch.float32)
    layer = NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16, backend="torch")
    assert layer.bias.dtype == torch.bfloat16
    x = _x(4, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # back to x's dtype, like bnb's Linear4bit
    expected = F.linear(x.bfloat16(), dequantize_nf4(layer.weight, torch.bfloat16), linear.bias.bfloat16()).float()
    assert torch.equal(y, expected)
    assert torch.equal(layer.dequantize(), dequantize_nf4(quantize_nf4(linear.weight), torch.bfloat16))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_lora_on_nf4_trains_adapters_like_on_the_dense_weight(backend):
    # LoRA over NF4Linear must equal LoRA over an nn.Linear holding the dequantized weight: same loss, same
    # gradients for A and B, and none for the base.
    linear = _linear(64, 24, True)
    nf4 = NF4Linear.from_linear(linear, backend=backend)
    dense = nn.Linear(64, 24)
    dense.weight.data, dense.bias.data = nf4.dequantize(torch.float32), linear.bias.data.clone()
    dense.requires_grad_(False)
    torch.manual_seed(5)
    lora_q = TinyLoRA(nf4)
    lora_d = TinyLoRA(dense)
    lora_d.load_state_dict({k: v for k, v in lora_q.state_dict().items() if k.startswith("lora_")}, strict=False)
    x = _x(3, 6, 64)
    loss_q = lora_q(x).square().mean()
    loss_d = lora_d(x).square().mean()
    loss_q.backward()
    loss_d.backward()
    torch.testing.assert_close(loss_q, loss_d, rtol=1e-6, atol=0)
    for name in ("lora_A", "lora_B"):
        g_q, g_d = getattr(lora_q, name).grad, getattr(lora_d, name).grad
        assert g_q is not None and g_q.abs().sum() > 0
        torch.testing.assert_close(g_q, g_d, rtol=1e-5, atol=1e-7)
    assert [n for n, p in lora_q.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_works_under_gradient_checkpointing(backend):
    lora = TinyLoRA(NF4Linear.from_linear(_linear(64, 16), backend=backend))
    x = _x(2, 5, 64).requires_grad_()
    lora(x).sum().backward()
    grads = [x.grad.clone(), lora.lora_A.grad.clone(), lora.lora_B.grad.clone()]
    x.grad = lora.lora_A.grad = lora.lora_B.grad = None
    checkpoint(lora, x, use_reentrant=False).sum().backward()
    for before, after in zip(grads, [x.grad, lora.lora_A.grad, lora.lora_B.grad]):
        assert torch.equal(before, after)


def test_state_dict_holds_hf_keys_and_round_trips():
    layer = NF4Linear.from_linear(_linear(96, 20, True, torch.bfloat16))
    model = nn.Sequential()
    model.add_module("q_proj", layer)
    sd = model.state_dict()
    expected = set(layer.weight.to_hf_state("q_proj")) | {"q_proj.bias"}
    assert set(sd) == expected
    assert sd["q_proj.weight.absmax"].dtype == torch.uint8
    fresh = nn.Sequential()
    fresh.add_module("q_proj", NF4Linear.from_linear(_linear(96, 20, True, torch.bfloat16, seed=9)))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.q_proj.dequantize(), layer.dequantize())
    assert torch.equal(fresh.q_proj.bias, layer.bias)
    with pytest.raises(RuntimeError, match="shape"):
        NF4Linear.from_linear(_linear(64, 20)).load_state_dict(layer.state_dict())


def test_to_dtype_keeps_the_4bit_format():
    layer = NF4Linear.from_linear(_linear(64, 8))
    before = layer.dequantize(torch.float32)
    layer.half()
    layer.to(torch.bfloat16)
    q = layer.weight
    assert q.packed.dtype == torch.uint8 and q.absmax.dtype == torch.uint8 and q.nested_absmax.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), before)
    assert layer.bias.dtype == torch.bfloat16  # the bias follows like any parameter; forward casts it anyway
    assert "bits_per_parameter" in repr(layer)


@pytest.mark.gpu
def test_moves_to_cuda_and_picks_triton():
    layer = NF4Linear.from_linear(_linear(128, 64, True, torch.bfloat16)).cuda()
    assert layer.weight.device.type == "cuda" and layer.weight.nested_absmax.is_cuda
    x = _x(3, 128, dtype=torch.bfloat16).cuda()
    ref = F.linear(x, layer.dequantize(), layer.bias)
    torch.testing.assert_close(layer(x), ref, rtol=2e-2, atol=2e-2)


def test_merge_lora_over_nf4_rounds_once_to_the_compute_dtype():
    # merge_lora on a QLoRA layer: dequantize(W0) + ΔW summed in float32, then one rounding to bf16 — not a bf16
    # dequantize followed by a second rounding of the sum.
    from minilora.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(64, 48), compute_dtype=torch.bfloat16, backend="torch"))
    apply_lora(model, r=4, alpha=8, targets=["0"])
    nn.init.normal_(model[0].lora_B.weight, std=0.01)
    q, delta = model[0].base.weight, model[0].delta_weight().float()
    merge_lora(model)
    assert type(model[0]) is cpu_matmul.Linear and model[0].weight.dtype == torch.bfloat16
    expected = (dequantize_nf4(q, torch.float32) + delta).bfloat16()
    assert torch.equal(model[0].weight, expected)
    twice_rounded = (dequantize_nf4(q, torch.bfloat16).float() + delta).bfloat16()
    assert not torch.equal(expected, twice_rounded)  # the test can tell the two apart


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_backward_keeps_only_the_4bit_weight_not_a_dense_copy(backend):
    # QLoRA's memory saving holds during training only if autograd does not keep the dequantized W until backward
    # (bnb's MatMul4Bit re-dequantizes in backward too). Record every tensor autograd saves for the base layer and
    # its grad_x: nothing of the weight's size may be among them, and grad_x must still be grad_y · dequant(W).
    layer = NF4Linear.from_linear(_linear(256, 192, True), backend=backend)
    x = _x(2, 3, 256).requires_grad_()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (192, 256) not in saved and (256, 192) not in saved, saved
    grad_y = _x(2, 3, 192, seed=7)
    y.backward(grad_y)
    torch.testing.assert_close(x.grad, grad_y @ dequantize_nf4(layer.weight, torch.float32), rtol=1e-5, atol=1e-6)
