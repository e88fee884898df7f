"""DoRA: split each adapted weight into a magnitude and a direction, and learn both.

Paper: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353). A weight matrix is a
magnitude times a direction, one per output feature (row of the (d_out, d_in) weight):

    W0 = m0 · W0 / ‖W0‖            m0 = ‖W0‖ (d_out,): the L2 norm of each row

DoRA fine-tunes the direction with LoRA and the magnitude directly:

    W' = m · (W0 + s·B A) / ‖W0 + s·B A‖        m: (d_out,) trainable, starts at ‖W0‖; s = alpha / r

so at step 0 (B = 0) W' = W0 exactly, as with LoRA. The paper (§4.3) treats the norm ‖W0 + s·BA‖ as a constant
in backward (`.detach()`): the gradient then never has to flow through a per-row norm of a (d_out, d_in) matrix,
which saves the memory of that matrix's graph, and the paper measured no loss of accuracy. PEFT does the same,
and so must we for the same gradients.

In the forward pass the dense W' is never built for the input: with g = m / ‖W0 + s·BA‖ (d_out,),

    y = base(x) + (g - 1) · (x W0ᵀ) + g · s · (x Aᵀ Bᵀ)         (= b + g · (x W0ᵀ + s · x Aᵀ Bᵀ))

the form PEFT computes, so that dropout (applied to the x of the two correction terms) acts exactly as there.
The norm still needs W0 itself once per forward: an nn.Linear base gives its weight, a 4-bit NF4Linear base is
dequantized (QDoRA) — `base_weight` is the only place that knows the difference, so DoRA composes with any frozen
base that LoRALinear accepts.

DoRALinear is a LoRALinear (same A, B, scale, dropout, PEFT names) with one more parameter,
`lora_magnitude_vector`, named as in PEFT's saved adapters. Merging folds W' into the base weight.

Not handled: DoRA on embeddings or convolutions, PEFT's optional weight-norm cache for inference.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear


class DoRALinear(LoRALinear):
    """y = x W'ᵀ + b with W' = m · (W0 + s·BA) / ‖W0 + s·BA‖ (row norms); A, B and m train."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__(base, r, alpha, dropout, use_rslora, dtype)
        with torch.no_grad():  # m0 = ‖W0 + s·BA‖ = ‖W0‖ at initialisation (B = 0)
            magnitude = self.weight_norm(self.base_weight(dtype))  # (d_out,)
        self.lora_magnitude_vector = nn.Parameter(magnitude)

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W0 as a dense (d_out, d_in) tensor: the nn.Linear's weight, or the 4-bit weight dequantized."""
        weight = getattr(self.base, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and not hasattr(self.base, "dequantize"):
            return weight.to(dtype)
        return self.base.dequantize(dtype)

    def weight_norm(self, w0: torch.Tensor) -> torch.Tensor:
        """‖W0 + s·BA‖ per output row, (d_out,), detached: a constant in backward (DoRA §4.3)."""
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach().to(w0.dtype)  # (d_out, r) @ (r, d_in)
        return torch.linalg.norm(w0 + self.scale * lora_weight, dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        y = self.base(x)  # (..., d_out) = x W0ᵀ + b
        if self.merged:  # the base already holds W'
            return y
        dtype = self.lora_A.weight.dtype
        w0 = self.base_weight(dtype)  # (d_out, d_in)
        g = self.lora_magnitude_vector / self.weight_norm(w0)  # (d_out,): m / ‖W0 + s·BA‖
        x_drop = self.dropout(x).to(dtype)
        lora_out = self.lora_B(self.lora_A(x_drop)) * self.scale  # (..., d_out): s · x Aᵀ Bᵀ
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = getattr(self.base, "bias", None)
            base_out = y.to(dtype) if bias is None else (y - bias).to(dtype)  # x W0ᵀ, reusing base(x)
        else:  # with dropout, the correction term sees the dropped x (as in PEFT)
            base_out = F.linear(x_drop, w0)
        return (y + (g - 1) * base_out + g * lora_out).to(y.dtype)

    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """W' = m · (W0 + s·BA) / ‖W0 + s·BA‖ in float32, (d_out, d_in)."""
        w0 = w0.float()
        g = self.lora_magnitude_vector.detach().float() / self.weight_norm(w0)  # (d_out,)
        return g[:, None] * (w0 + self.delta_weight())

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """W0 = W' / g − s·BA, with g the factor merge() multiplied by (kept: the norm of W0 + s·BA cannot be
        recovered from W' alone, whose rows all have norm m)."""
        return merged.float() / self._merged_g[:, None] - self.delta_weight()

    def merge(self) -> None:
        if not self.merged:  # remember g: unmerging must divide by the very factor merging multiplied by
            self._merged_g = (self.lora_magnitude_vector.detach().float()
                              / self.weight_norm(self.base_weight(torch.float32)))
        super().merge()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
