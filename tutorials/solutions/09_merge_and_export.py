"""Solutions to chapter 9's exercises."""


def peft_keys(module_names: list[str]) -> list[str]:
    """Exercise 9.1: PEFT names each tensor base_model.model.<module>.lora_A/lora_B.weight."""
    return [f"base_model.model.{name}.lora_{ab}.weight" for name in module_names for ab in "AB"]


def qlora_merge(q, A, B, scale):
    """Exercise 9.2: merge into the base the adapter was trained against: the dequantized NF4 weight."""
    from minilora.quant.nf4 import dequantize_nf4

    return dequantize_nf4(q, dtype=A.dtype) + scale * B @ A
