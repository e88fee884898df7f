"""cpu_matmul.py: oneDNN's float32 products equal float64 oracles to float32 rounding, gradients included, and are
the ones training actually runs (the model's Linear, FrozenLinearLoRA, the chunked loss)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minilora import cpu_matmul
from minilora.config import ModelConfig
from minilora.lora import apply_lora
from minilora.loss import chunked_next_token_loss
from minilora.model import Transformer

from op_recorder import OpRecorder

needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="this torch build has no oneDNN")


def onednn_calls() -> OpRecorder:
    """Records the (input, weight) shapes of every oneDNN linear."""
    return OpRecorder(lambda func, args, out: (tuple(args[0].shape), tuple(args[1].shape))
                      if func == torch.ops.mkldnn._linear_pointwise.default else None)


@needs_onednn
@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W.T view"])
def test_linear_equals_float64_product(transposed):
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 37, 64), torch.randn(48, 64), torch.randn(48)
    if transposed:  # multiply by a (64, 48) matrix held as the transposed view of a (48, 64) tensor
        w = torch.randn(64, 48).T
    with onednn_calls() as calls:
        y = cpu_matmul.linear(x, w, b)
    assert calls.seen == [((3, 37, 64), (48, 64))]  # oneDNN ran, on the view as given (no copy made first)
    ref = (x.double() @ w.double().T + b.double()).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_autocast_keep_f_linear():
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    with onednn_calls() as calls:
        assert torch.equal(cpu_matmul.linear(x.double(), w.double()), F.linear(x.double(), w.double()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_matmul.linear(x, w).dtype == torch.bfloat16
    assert calls.seen == []


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_function_gradients_equal_float64_autograd(bias):
    torch.manual_seed(1)
    layer = cpu_matmul.Linear(24, 40, bias=bias)
    x = torch.randn(2, 9, 24, requires_grad=True)
    with onednn_calls() as calls:
        y = layer(x)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
    # forward, grad_x = g W (W.T as the weight), grad_W = gᵀ x (xᵀ as the weight)
    assert calls.seen == [((2, 9, 24), (40, 24)), ((2, 9, 40), (24, 40)), ((40, 18), (24, 18))]
    ref = cpu_matmul.Linear(24, 40, bias=bias).double()
    ref.load_state_dict(layer.state_dict())
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64)
    (y64 * torch.linspace(-1, 1, 40).double()).sum().backward()
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad.float(), rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad.float(), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_frozen_linear_computes_only_grad_x():
    layer = cpu_matmul.Linear(16, 8).requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    with onednn_calls() as calls:
        layer(x).sum().backward()
    assert calls.seen == [((4, 16), (8, 16)), ((4, 8), (16, 8))]  # no grad_W product for a frozen weight
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, 16), rtol=1e-6, atol=1e-6)


def test_linear_is_nn_linear_and_no_grad_forward_is_f_linear_exactly():
    torch.manual_seed(2)
    ours, plain = cpu_matmul.Linear(12, 6), nn.Linear(12, 6)
    plain.load_state_dict(ours.state_dict())  # same keys and shapes
    assert isinstance(ours, nn.Linear)
    x = torch.randn(3, 12)
    with torch.no_grad(), onednn_calls() as calls:
        assert torch.equal(ours(x), plain(x))  # evaluation keeps MKL, the reference's kernel
    assert calls.seen == []


@needs_onednn
@pytest.mark.parametrize("rows", [3, 7, 100])  # several slices with a remainder, one slice
def test_accumulate_at_b_adds_the_product(rows):
    torch.manual_seed(3)
    a, b, out = torch.randn(11, 20), torch.randn(11, 5), torch.randn(20, 5)
    expected = out.double() + a.double().T @ b.double()
    result = cpu_matmul.accumulate_at_b_(out, a, b, rows=rows)
    assert result is out  # in place
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_training_step_multiplies_through_onednn_everywhere():
    """LoRA on q/v of a 2-layer Llama: every projection (LoRA bases and the frozen others) and the vocabulary
    head's forward and grad_h products run through oneDNN, and evaluation through none."""
    cfg = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = Transformer(cfg)
    apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    ids = torch.randint(0, 97, (2, 6))
    with onednn_calls() as calls:
        hidden = model(ids, return_hidden=True)  # (B, T, C)
        loss, _ = chunked_next_token_loss(hidden, model.lm_head_weight, ids)
        loss.backward()
    r = 4  # the LoRA products have r rows in their weight (A, Bᵀ) or in their input (gBᵀ for grad_A)
    lora = [c for c in calls.seen if r in (c[0][0], c[1][0])]
    weights = [w for x, w in calls.seen if r not in (x[0], w[0])]
    # forward: q, k, v, o, gate, up, down per layer and the head; backward: the head's grad_h, grad_x of the 7 block
    # linears of layer 1, and of layer 0 only o, gate, up, down (q, k, v read the frozen embeddings: no grad_x)
    assert sum(w[0] == 97 for w in weights) == 1 and sum(w[1] == 97 for w in weights) == 1
    assert len(weights) == 2 * 7 + 1 + 1 + 7 + 4
    assert len(lora) == 3 * 4  # x Aᵀ, grad_y B and gBᵀ x of the 4 adapted layers (grad_B stays MKL's)
    with torch.no_grad(), onednn_calls() as calls:
        model(ids)
    assert calls.seen == []
