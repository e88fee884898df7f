"""Solutions to chapter 7's exercises."""


def response_only(prompt_ids: list[int], reply_ids: list[int]) -> dict:
    """Exercise 7.1: the loss sees the reply (with its end-of-turn token), not the prompt."""
    return {"input_ids": prompt_ids + reply_ids, "labels": [-100] * len(prompt_ids) + reply_ids}


def best_step(history: list[tuple[int, float]]) -> int:
    """Exercise 7.2: the step of the lowest validation loss (min keeps the first on ties)."""
    return min(history, key=lambda step_loss: step_loss[1])[0]


def packed_row(lengths: list[int]):
    """Exercise 7.3: segment 1, 2, ... per sample, positions restarting at 0 in each."""
    segment_ids = [k + 1 for k, n in enumerate(lengths) for _ in range(n)]
    position_ids = [i for n in lengths for i in range(n)]
    return segment_ids, position_ids
