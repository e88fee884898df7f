"""Solutions to chapter 4's exercises."""

import math

import torch


def lora_forward(x, W0, A, B, alpha, r):
    """Exercise 4.1: y = x·W0ᵀ + (alpha/r)·(x·Aᵀ)·Bᵀ — A compresses d_in to r, B expands r to d_out."""
    return x @ W0.T + (alpha / r) * (x @ A.T) @ B.T


def init_lora(d_in: int, d_out: int, r: int):
    """Exercise 4.2: A Kaiming-uniform (a=√5, as nn.Linear and PEFT), B zero."""
    A = torch.empty(r, d_in)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, torch.zeros(d_out, r)


def merged_weight(W0, A, B, alpha, r):
    """Exercise 4.3: W = W0 + (alpha/r)·B·A, shape (d_out, d_in)."""
    return W0 + (alpha / r) * B @ A
