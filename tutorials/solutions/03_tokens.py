"""Solutions to chapter 3's exercises."""

import torch


def pad_batch(rows: list[list[int]], pad_id: int):
    """Exercise 3.1: right-pad to the longest row; padding gets attention 0 and label -100."""
    T = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows])  # (B, T)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])  # (B, T)
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # (B, T)
    return input_ids, attention_mask, labels


def mask_prompt(input_ids: list[int], prompt_len: int) -> list[int]:
    """Exercise 3.2: the -100 mask written by hand."""
    return [-100] * prompt_len + list(input_ids[prompt_len:])


def masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exercise 3.3: position t predicts token t+1; -100 targets are left out of the mean."""
    z = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B·(T-1), V)
    targets = labels[:, 1:].reshape(-1)  # (B·(T-1),)
    return torch.nn.functional.cross_entropy(z, targets, ignore_index=-100)
