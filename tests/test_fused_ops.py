"""fused_ops.py and lora.FrozenLinearLoRA against the plain PyTorch ops they replace: same forward bits, same
gradients up to float32 rounding."""

import pytest
import torch
import torch.nn.functional as F

import minilora.lora as lora
from minilora.fused_ops import rms_norm, swiglu


def _grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("weight_trains", [False, True])
def test_rms_norm_equals_the_plain_ops(weight_trains):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24, requires_grad=True)
    w = (torch.randn(24) * 0.1 + 1).requires_grad_(weight_trains)
    g = torch.randn(2, 5, 24)
    plain = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    fused = rms_norm(x, w, 1e-6)
    assert torch.equal(fused, plain)
    inputs = [x, w] if weight_trains else [x]
    for a, b in zip(_grads(fused, inputs, g), _grads(plain, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_swiglu_equals_the_plain_ops():
    torch.manual_seed(0)
    gate, up = torch.randn(3, 7, 40, requires_grad=True), torch.randn(3, 7, 40, requires_grad=True)
    g = torch.randn(3, 7, 40)
    plain, fused = F.silu(gate) * up, swiglu(gate, up)
    assert torch.equal(fused, plain)
    for a, b in zip(_grads(fused, [gate, up], g), _grads(plain, [gate, up], g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_linear_lora_equals_the_autograd_path(bias, monkeypatch):
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(24, 40, bias=bias), r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 5, 24, requires_grad=True)
    g = torch.randn(3, 5, 40)
    params = [x, layer.lora_A.weight, layer.lora_B.weight]
    assert lora._fusable(layer, x)
    fused = layer(x)
    assert fused.grad_fn.name().startswith("FrozenLinearLoRA")  # the fused path really ran
    grads_fused = _grads(fused, params, g)
    monkeypatch.setattr(lora, "_fusable", lambda *a: False)
    plain = layer(x)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_fused, _grads(plain, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
