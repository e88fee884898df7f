"""Rotary position embeddings (RoPE), with Llama 3.1's and linear frequency scaling.

RoFormer (Su et al. 2021, section 3.2): split each query/key head into pairs of dims and rotate pair i by the angle
`position * inv_freq[i]`, with inv_freq[i] = theta ** (-2i / d). The dot product of a rotated query and key then
depends only on their distance. Like Hugging Face (and unlike the paper's interleaved pairs), dim j is paired with
dim j + d/2 ("rotate_half"), which is how the released checkpoints' q/k weights are laid out.

Context-extension variants change only inv_freq:
- linear (Chen et al. 2023, "position interpolation"): every frequency / factor.
- llama3 (Llama 3.1): wavelengths longer than original_max / low_freq_factor are divided by `factor`, shorter than
  original_max / high_freq_factor are kept, and the band in between is interpolated smoothly.
Partial rotary (Phi-3 `partial_rotary_factor`): only the first `rotary_dim` dims of a head rotate.

Not handled: dynamic NTK, YaRN and LongRoPE (config.py refuses them).
"""

import math

import torch


def inverse_frequencies(
    rotary_dim: int,
    theta: float,
    rope_type: str = "default",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The rotation speed of each dim pair, float32 (rotary_dim // 2,), computed as transformers does."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    inv_freq = 1.0 / (theta**exponents)  # (rotary_dim // 2,)
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    if rope_type != "default":
        raise ValueError(f"unknown rope_type {rope_type!r}")
    return inv_freq


def _llama3_scaling(inv_freq, factor, low_freq_factor, high_freq_factor, original_max):
    wavelen = 2 * math.pi / inv_freq  # tokens per full turn of each pair
    low_freq_wavelen = original_max / low_freq_factor  # longer than this: slow pairs, interpolate fully
    high_freq_wavelen = original_max / high_freq_factor  # shorter than this: fast pairs, keep
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # In between, blend the scaled and unscaled frequency; smooth = 0 at low_freq_wavelen, 1 at high_freq_wavelen.
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin of every (position, pair) angle, each (B, T, rotary_dim), in `dtype`.

    The angles are computed in float32 (bf16 positions would be too coarse past a few hundred tokens) and only the
    result is rounded, as transformers does.
    """
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, rotary_dim // 2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, rotary_dim): pair j with j + rotary_dim / 2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's two halves: a 90° turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, H, T, D) by angles cos/sin (B, T, rotary_dim); dims >= rotary_dim pass through."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rotary_dim): same angles for every head
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
