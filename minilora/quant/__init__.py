"""The 4-bit code of QLoRA: NF4 weights bit-identical to bitsandbytes, the frozen NF4 linear layer, and the
bitsandbytes-format 4-bit checkpoint.

    nf4.py             NF4 quantize / dequantize with double quantization (the format, as bitsandbytes stores it)
    nf4_linear.py      NF4Linear: a frozen 4-bit base layer (Triton kernels on GPU, PyTorch on CPU)
    nf4_tensor.py      NF4Tensor: the 4-bit weight as a tensor subclass FSDP2 shards on block boundaries
    bnb_checkpoint.py  reading and writing 4-bit checkpoints in transformers + bitsandbytes' layout; model memory

The Triton kernels themselves live in the top-level kernels/ folder (installed as minilora.kernels).
"""

from .bnb_checkpoint import dequantize_model, model_memory
from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from .nf4_linear import NF4Linear
from .nf4_tensor import NF4Tensor

__all__ = ["NF4Linear", "NF4Tensor", "NF4Weight", "dequantize_model", "dequantize_nf4", "model_memory", "quantize_nf4"]
