"""Solutions to chapter 8's exercises."""


def qlora_forward(x, q, A, B, scale):
    """Exercise 8.1: dequantize the frozen NF4 base, then add the LoRA path (which stays in float32)."""
    from minilora.quant.nf4 import dequantize_nf4

    W0 = dequantize_nf4(q, dtype=x.dtype)  # (d_out, d_in)
    return x @ W0.T + scale * (x @ A.T) @ B.T


def base_bytes(n_params: int, method: str) -> float:
    """Exercise 8.2: bf16 = 2 bytes per weight; NF4 = 4 bits + an 8-bit scale per 64 + fp32 per 256 blocks."""
    if method == "bf16":
        return 2 * n_params
    blocks = n_params / 64
    return n_params / 2 + blocks + 4 * (blocks / 256) + 4  # codes, absmax codes, nested absmax, offset
