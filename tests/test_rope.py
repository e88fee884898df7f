"""Rotary embeddings: frequencies against transformers' RoPE initialisers, and the rotation's defining property."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from minilora.rope import (apply_rope, inverse_frequencies, longrope_attention_factor, longrope_inverse_frequencies,
                          rope_cos_sin, rotate, rotation_tables, yarn_attention_factor, yarn_inverse_frequencies)


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


@pytest.mark.parametrize("params", [
    # Qwen2.5 / Qwen3 long-context recipe
    {"rope_theta": 1_000_000.0, "factor": 4.0, "original_max_position_embeddings": 32768},
    # non-default betas, and a ramp whose ends are not rounded to whole pairs
    {"rope_theta": 500_000.0, "factor": 8.0, "original_max_position_embeddings": 8192, "beta_fast": 16.0,
     "beta_slow": 2.0, "truncate": False},
    # DeepSeek-style temperature weights (equal weights cancel: attention factor 1)
    {"rope_theta": 10_000.0, "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 1.0},
    {"rope_theta": 10_000.0, "factor": 2.5, "original_max_position_embeddings": 2048, "mscale": 1.0,
     "mscale_all_dim": 0.5, "truncate": False},
    # awkward: a short original context (every correction dim clamps to 0) and a factor below 1 (no sharpening)
    {"rope_theta": 10_000.0, "factor": 16.0, "original_max_position_embeddings": 16},
    {"rope_theta": 10_000.0, "factor": 0.5, "original_max_position_embeddings": 4096},
])
@pytest.mark.parametrize("head_dim, partial", [(16, 1.0), (64, 1.0), (128, 1.0), (128, 0.75), (96, 0.5)])
def test_yarn_matches_transformers(params, head_dim, partial):
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=int(params["original_max_position_embeddings"] * params["factor"]),
                         rope_parameters={"rope_type": "yarn", "partial_rotary_factor": partial, **params})
    expected, expected_scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    rotary_dim = int(head_dim * partial)
    got = yarn_inverse_frequencies(rotary_dim, params["rope_theta"], params["factor"],
                                   params["original_max_position_embeddings"], params.get("beta_fast", 32.0),
                                   params.get("beta_slow", 1.0), params.get("truncate", True))
    assert got.dtype == torch.float32 and got.shape == (rotary_dim // 2,)
    assert torch.equal(got, expected)  # same float32 operations in the same order
    scale = yarn_attention_factor(params["factor"], params.get("mscale"), params.get("mscale_all_dim"))
    assert scale == pytest.approx(expected_scale, rel=1e-12)


def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones():
    """theta 1e4, 8 pairs, 4096 tokens: pairs 0-2 turn > 32 times (652, 206, 65: kept), pairs 6-7 less than once
    (0.65, 0.21: divided by factor); the ramp's ends 2.6 and 5.6 round outwards to pairs 2 and 6."""
    plain = inverse_frequencies(16, 10_000.0)
    yarn = yarn_inverse_frequencies(16, 10_000.0, factor=4.0, original_max_position_embeddings=4096)
    # yarn = (1 - w) plain + w plain / 4: the interpolation weight w ramps linearly over pairs 2..6
    w = (plain - yarn) / (plain - plain / 4)
    assert torch.allclose(w, torch.tensor([0, 0, 0, 0.25, 0.5, 0.75, 1, 1]), atol=1e-6)
    assert yarn_attention_factor(4.0) == pytest.approx(0.1 * math.log(4) + 1)


@pytest.mark.parametrize("factor", [None, 1.0, 8.0])  # None: max_position_embeddings / original_max (Phi-3)
@pytest.mark.parametrize("head_dim, partial", [(16, 0.5), (96, 1.0), (128, 0.75)])  # Phi-3-mini, Phi-4-mini
def test_longrope_matches_transformers(factor, head_dim, partial):
    pairs = int(head_dim * partial) // 2
    short, long = [1.0 + 0.05 * i for i in range(pairs)], [1.0 + 1.7 * i for i in range(pairs)]
    params = {"rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": partial,
              "short_factor": short, "long_factor": long, "original_max_position_embeddings": 4096}
    if factor is not None:
        params["factor"] = factor
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=131072, rope_parameters=params)
    init = ROPE_INIT_FUNCTIONS["longrope"]
    expected_short, expected_scale = init(config, "cpu")  # no length given: the short list
    expected_long, _ = init(config, "cpu", seq_len=4097)  # one token past the original context
    rotary_dim = int(head_dim * partial)
    assert torch.equal(longrope_inverse_frequencies(rotary_dim, 10_000.0, short), expected_short)
    assert torch.equal(longrope_inverse_frequencies(rotary_dim, 10_000.0, long), expected_long)
    scale = longrope_attention_factor(131072 / 4096 if factor is None else factor, 4096)
    assert scale == pytest.approx(expected_scale, rel=1e-12)
    if factor is None:
        assert scale == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))  # Phi-3-128k: 1.19


def test_attention_factor_scales_cos_and_sin():
    inv_freq = inverse_frequencies(8, 10_000.0)
    positions = torch.arange(5).expand(2, 5)
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32)
    cos2, sin2 = rope_cos_sin(positions, inv_freq, torch.float32, scale=1.5)
    assert torch.equal(cos2, cos * 1.5) and torch.equal(sin2, sin * 1.5)


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


@pytest.mark.parametrize("rotary_dim, head_dim", [(16, 16), (8, 16), (6, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_with_tables_is_apply_rope_bit_for_bit(rotary_dim, head_dim, dtype):
    """The model's rotation (sign folded into the sin table, a roll for rotate_half) against the formula as written,
    on a transposed (B, H, T, D) view like the model's queries."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, head_dim).to(dtype).transpose(1, 2)  # (B, H, T, D), not contiguous
    cos, sin = rope_cos_sin(torch.arange(40, 47).expand(2, 7), inverse_frequencies(rotary_dim, 10_000.0), dtype)
    got = rotate(x, *rotation_tables(cos, sin))
    assert torch.equal(got, apply_rope(x, cos, sin))
    assert not torch.equal(got, x)
