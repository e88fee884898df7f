"""Solutions to chapter 2's exercises."""

from torch import nn


def lora_trainable(d_in: int, d_out: int, r: int) -> int:
    """Exercise 2.1: A is (r × d_in) and B is (d_out × r)."""
    return r * (d_in + d_out)


def full_ft_bytes(n_params: int) -> int:
    """Exercise 2.2: fp32 weights (4 B) + gradients (4 B) + AdamW's exp_avg and exp_avg_sq (4 B each)."""
    return 16 * n_params


def predict_trainable(model: nn.Module, r: int, targets) -> int:
    """Exercise 2.3: Σ r·(d_in + d_out) over the linear layers LoRA would wrap (the model is not changed)."""
    from minilora.lora import select_targets

    return sum(r * (m.in_features + m.out_features)
               for m in (model.get_submodule(name) for name in select_targets(model, targets)))
