"""Rotary embeddings: frequencies against transformers' RoPE initialisers, and the rotation's defining property."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from minilora.rope import apply_rope, inverse_frequencies, rope_cos_sin


@pytest.mark.parametrize("params", [
    {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
    # Llama 3.1's published values
    {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    # awkward: a short original context puts many pairs in the interpolated middle band
    {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 3.0, "low_freq_factor": 2.0,
     "high_freq_factor": 8.0, "original_max_position_embeddings": 64},
])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_scaled_frequencies_match_transformers(params, head_dim):
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         rope_parameters=dict(params))
    expected, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    kwargs = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
    got = inverse_frequencies(head_dim, params["rope_theta"], params["rope_type"], **kwargs)
    assert got.dtype == torch.float32 and got.shape == (head_dim // 2,)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)


def test_default_frequencies_are_the_geometric_ladder():
    got = inverse_frequencies(8, 10_000.0)
    assert torch.allclose(got, torch.tensor([10_000.0 ** (-i / 8) for i in (0, 2, 4, 6)]))


@pytest.mark.parametrize("rotary_dim, head_dim", [(16, 16), (8, 16), (6, 32)])
def test_scores_depend_only_on_relative_position(rotary_dim, head_dim):
    """q·k after RoPE at positions (m, n) equals that at (m + s, n + s): the point of rotary embeddings."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, head_dim), torch.randn(1, 2, 1, head_dim)  # (B, H, T, D)
    inv_freq = inverse_frequencies(rotary_dim, 10_000.0)

    def score(m, n):
        cos_q, sin_q = rope_cos_sin(torch.tensor([[m]]), inv_freq, torch.float64)
        cos_k, sin_k = rope_cos_sin(torch.tensor([[n]]), inv_freq, torch.float64)
        return (apply_rope(q.double(), cos_q, sin_q) * apply_rope(k.double(), cos_k, sin_k)).sum(-1)

    assert torch.allclose(score(7, 3), score(107, 103), atol=1e-9)
    assert not torch.allclose(score(7, 3), score(7, 4), atol=1e-3)


def test_partial_rotary_leaves_the_tail_untouched_and_keeps_norms():
    x = torch.randn(2, 3, 5, 16)
    cos, sin = rope_cos_sin(torch.arange(5).expand(2, 5), inverse_frequencies(8, 10_000.0), torch.float32)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation
    assert torch.equal(y[:, :, 0], x[:, :, 0])  # position 0: angle 0
    # pair (0, 4) at position 1 turns by angle inv_freq[0] = 1 radian
    c, s = math.cos(1.0), math.sin(1.0)
    assert torch.allclose(y[..., 1, 0], c * x[..., 1, 0] - s * x[..., 1, 4], atol=1e-6)
