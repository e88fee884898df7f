"""Solutions to chapter 1's exercises (checked by tutorials/_exercises.py; tests/test_tutorial_exercises.py)."""

import math


def perplexity(mean_loss: float) -> float:
    """Exercise 1.1: perplexity = e^loss (loss in nats per token)."""
    return math.exp(mean_loss)


def trained_share(labels: list[list[int]]) -> float:
    """Exercise 1.2: the share of positions the loss counts (label != -100)."""
    flat = [label for row in labels for label in row]
    return sum(label != -100 for label in flat) / len(flat)
