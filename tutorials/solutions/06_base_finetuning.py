"""Solutions to chapter 6's exercises."""

import torch


def pack(docs: list[list[int]], block_size: int, eos_id: int) -> list[list[int]]:
    """Exercise 6.1: one stream, EOS after each document, cut every block_size; drop a last block under 2 tokens."""
    stream = [t for doc in docs for t in doc + [eos_id]]
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    return [b for b in blocks if len(b) >= 2]


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Exercise 6.2: mask by attention_mask, never by `input_ids == pad_id` (pad may equal EOS)."""
    return input_ids.masked_fill(attention_mask == 0, -100)
