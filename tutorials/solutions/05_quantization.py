"""Solutions to chapter 5's exercises."""

import torch


def nf4_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Exercise 5.1: scale by the block's absmax, take the nearest of the 16 NF4 values, scale back."""
    from minilora.quant.nf4 import NF4_CODE

    absmax = x.abs().max()
    nearest = (x[:, None] / absmax - NF4_CODE[None, :]).abs().argmin(dim=1)  # (64,) indices 0..15
    return NF4_CODE[nearest] * absmax


def bits_per_parameter(double_quant: bool) -> float:
    """Exercise 5.2: 4 bits per weight plus the block's scale shared by 64 weights.

    Without double quantization the scale is fp32 (32/64 = 0.5 bit); with it the scale is an 8-bit code
    (8/64 = 0.125) plus one fp32 scale per 256 blocks (32/(64·256) ≈ 0.002)."""
    return 4 + 8 / 64 + 32 / (64 * 256) if double_quant else 4 + 32 / 64
