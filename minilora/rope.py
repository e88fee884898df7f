"""Rotary position embeddings (RoPE), with the context-extension variants of Llama 3.1, YaRN and LongRoPE.

RoFormer (Su et al. 2021, section 3.2): split each query/key head into pairs of dims and rotate pair i by the angle
`position * inv_freq[i]`, with inv_freq[i] = theta ** (-2i / d). The dot product of a rotated query and key then
depends only on their distance. Like Hugging Face (and unlike the paper's interleaved pairs), dim j is paired with
dim j + d/2 ("rotate_half"), which is how the released checkpoints' q/k weights are laid out.

Pair i turns once every wavelength_i = 2π / inv_freq[i] tokens. A model pre-trained on `original_max` tokens has
seen the fast pairs turn many times but the slow ones (wavelength > original_max) only part of a turn, so beyond
original_max the slow pairs reach angles never seen in training. Context-extension variants change inv_freq:
- linear (Chen et al. 2023, "position interpolation"): every frequency / factor.
- llama3 (Llama 3.1): wavelengths longer than original_max / low_freq_factor are divided by `factor`, shorter than
  original_max / high_freq_factor are kept, and the band in between is interpolated smoothly.
- yarn (Peng et al. 2023, "YaRN"): "NTK-by-parts" interpolation, the same idea measured in turns: pairs that
  turn more than beta_fast times within original_max are kept, pairs that turn fewer than beta_slow times are
  divided by `factor`, with a linear ramp over the pair index in between. YaRN also sharpens attention with a
  temperature t: cos and sin are multiplied by sqrt(1/t) = 0.1 ln(factor) + 1, so every q·k score by 1/t.
- longrope (Ding et al. 2024, "LongRoPE", as used by Phi-3 / Phi-3.5 / Phi-4-mini): each pair has its own searched
  rescale factor, inv_freq[i] / rescale[i], from one of two lists: `short_factor` while the sequence fits in
  original_max, `long_factor` beyond it (the choice is made in model.py, per forward call). cos and sin are
  multiplied by sqrt(1 + ln(factor) / ln(original_max)).
Partial rotary (Phi-3 `partial_rotary_factor`): only the first `rotary_dim` dims of a head rotate.

Not handled: dynamic NTK (config.py refuses it).
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
    """The rotation speed of each dim pair, float32 (rotary_dim // 2,), computed as transformers does.

    For "default", "linear" and "llama3"; YaRN and LongRoPE have their own functions below.
    """
    inv_freq = 1.0 / (theta ** _exponents(rotary_dim, device))  # (rotary_dim // 2,)
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    if rope_type != "default":
        raise ValueError(f"unknown rope_type {rope_type!r}")
    return inv_freq


def _exponents(rotary_dim: int, device=None) -> torch.Tensor:
    """2i / rotary_dim for each pair i, float32 (rotary_dim // 2,): inv_freq[i] = theta ** -exponents[i]."""
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim


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


def yarn_inverse_frequencies(
    rotary_dim: int,
    theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies (Peng et al. 2023), float32 (rotary_dim // 2,).

    Pair i keeps its frequency if it turns more than beta_fast times within original_max tokens, is divided by
    `factor` if it turns fewer than beta_slow times, and in between is blended with a weight that is linear in i.
    truncate: round the ramp's ends outwards to whole pairs (YaRN's reference code does; some configs turn it off).
    """
    d = rotary_dim
    wavelength_over_2pi = theta ** _exponents(d, device)  # (d // 2,) = 1 / inv_freq
    extrapolated = 1.0 / wavelength_over_2pi  # the pre-trained frequencies, kept for fast pairs
    interpolated = 1.0 / (factor * wavelength_over_2pi)  # position interpolation, for slow pairs
    low = _pair_turning(beta_fast, d, theta, original_max_position_embeddings)  # a smaller i turns faster
    high = _pair_turning(beta_slow, d, theta, original_max_position_embeddings)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # a one-pair ramp would divide by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0 up to low, 1 from high
    keep = (1 - ramp).to(device)  # 1: keep the pair's frequency, 0: interpolate it
    return interpolated * (1 - keep) + extrapolated * keep


def _pair_turning(turns: float, rotary_dim: int, theta: float, original_max: int) -> float:
    """The (fractional) pair index i whose pair turns `turns` times within original_max tokens.

    Pair i's wavelength is 2π theta^(2i / d); setting original_max / wavelength = turns and solving for i gives
    i = d ln(original_max / (2π turns)) / (2 ln theta).
    """
    return rotary_dim * math.log(original_max / (turns * 2 * math.pi)) / (2 * math.log(theta))


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """YaRN's cos/sin multiplier sqrt(1/t) = 0.1 ln(factor) + 1, t being its attention temperature (Peng et al. 2023).

    DeepSeek-style configs give two weights instead: m(mscale) / m(mscale_all_dim), with m(k) = 0.1 k ln(factor) + 1
    (equal weights cancel to 1). No sharpening when the context is not extended (factor <= 1).
    """

    def m(k: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * k * math.log(factor) + 1.0

    if mscale and mscale_all_dim:
        return m(mscale) / m(mscale_all_dim)
    return m()


def longrope_inverse_frequencies(rotary_dim: int, theta: float, rescale: list[float] | tuple[float, ...],
                                 device: torch.device | str | None = None) -> torch.Tensor:
    """LongRoPE frequencies, float32 (rotary_dim // 2,): pair i turns rescale[i] times slower than in RoFormer.

    rescale is one of the config's two searched lists (short_factor or long_factor), one number per pair.
    """
    rescale = torch.tensor(rescale, dtype=torch.float32, device=device)  # (rotary_dim // 2,)
    return 1.0 / (rescale * theta ** _exponents(rotary_dim, device))


def longrope_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
    """LongRoPE's cos/sin multiplier sqrt(1 + ln(factor) / ln(original_max)); 1 when the context is not extended.

    factor = max_position_embeddings / original_max for Phi-3 (e.g. 131072 / 4096 = 32 gives 1.19).
    """
    if factor <= 1:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos and sin of every (position, pair) angle, times `scale`, each (B, T, rotary_dim), in `dtype`.

    The angles are computed in float32 (bf16 positions would be too coarse past a few hundred tokens) and only the
    result is rounded, as transformers does. scale is YaRN's / LongRoPE's attention factor (1 otherwise): scaling
    both q and k by it scales every attention score by scale².
    """
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, rotary_dim // 2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, rotary_dim): pair j with j + rotary_dim / 2
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's two halves: a 90° turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, H, T, D) by angles cos/sin (B, T, rotary_dim); dims >= rotary_dim pass through.

    The formula as written; the model runs the same numbers through rotation_tables + rotate (fewer passes)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rotary_dim): same angles for every head
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, rotary_dim) -> cos and a signed sin (B, 1, T, rotary_dim), made once per forward for `rotate`.

    rotate_half(x) * sin = (-x2, x1) * (s1, s2) = (x2, x1) * (-s1, s2): the minus sign moves from every query and
    key of every layer onto the table, which is made once. (-a) * b and a * (-b) are the same float, so nothing
    changes but the work.
    """
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, None], signed_sin[:, None]  # the head axis: same angles for every head


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rope(x, cos, sin), bit for bit, from rotation_tables(cos, sin): x (B, H, T, D).

    (x2, x1) is x rolled by half the rotary dims: one pass instead of rotate_half's split, negation and concatenation.
    Training and every decoding step rotate q and k in each layer, so those passes add up (~2x faster per call).
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + x.roll(rotary_dim // 2, dims=-1) * signed_sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + x_rot.roll(rotary_dim // 2, dims=-1) * signed_sin, x_pass), dim=-1)
