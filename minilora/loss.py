"""The next-token (causal language-modelling) loss, written out, and a chunked version that saves memory.

A causal LM's logits at position t predict the token at t+1, so the loss pairs logits[:, :-1] with labels[:, 1:]:

    loss = Σ_t mask_t · (logsumexp(z_t) − z_t[y_{t+1}]) / Σ_t mask_t,   mask_t = (y_{t+1} ≠ -100)

Label -100 marks positions that are not trained on (padding, prompt tokens in SFT), as in PyTorch's
`cross_entropy(ignore_index=-100)` and Hugging Face's models. Both functions return `(loss, n_tokens)`: with
gradient accumulation the trainer sums `reduction="sum"` losses over the micro-batches and divides by the total
number of counted tokens, so that every token weighs the same however the batch was split. (Averaging per-micro-
batch means would give a short sequence's tokens more weight than a long one's.)

Memory: the float32 logits of a batch are tokens × vocab × 4 bytes — 8 × 2048 tokens with Llama 3's vocabulary
(V = 128,256) is 8.4 GB, twice a 1B model's float32 weights. `chunked_next_token_loss` starts from the final
hidden states and the vocabulary head, computes the logits of `chunk_size` rows at a time and turns each chunk
into its share of the loss and of the gradient at once, so only chunk_size × vocab floats are alive at a time (the
idea of Liger-Kernel's fused linear cross-entropy, without the fusion). Gemma-2-style logit soft-capping
(cap · tanh(z / cap)) is supported.

Not handled: label smoothing, z-loss, a bias on the vocabulary head, tensor-parallel vocabularies.
"""

import torch

IGNORE_INDEX = -100  # the label of a position the loss skips (padding, prompts), as in PyTorch and transformers


def _shifted_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Targets aligned with positions: targets[..., t] = labels[..., t+1]; the last position predicts nothing."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)  # (..., T)


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many positions of `labels` (..., T) are predicted and counted by the loss (the trainer's denominator)."""
    return int((labels[..., 1:] != ignore_index).sum())


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                    reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits (..., T, V) against the next tokens of labels (..., T), computed in float32.

    Returns (loss, n_tokens): loss is the mean over counted tokens ("mean", 0 when none is counted — where
    F.cross_entropy would give nan) or their sum ("sum"); n_tokens is an int64 tensor.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    z = logits[..., :-1, :].float()  # (..., T-1, V); float32: bf16 (8 significant bits) would round the sum
    targets = labels[..., 1:]  # (..., T-1)
    mask = targets != ignore_index
    safe_targets = targets.masked_fill(~mask, 0)  # any valid index; masked out below
    log_normaliser = torch.logsumexp(z, dim=-1)  # (..., T-1)
    target_logit = z.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (..., T-1)
    nll = (log_normaliser - target_logit) * mask  # -log softmax(z)[y]
    n_tokens = mask.sum()
    loss = nll.sum()
    return (loss if reduction == "sum" else loss / n_tokens.clamp(min=1)), n_tokens


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None):
    """Float32 logits (n, V) of the hidden rows h (n, C), and tanh(raw / cap) when soft-capping (else None)."""
    # h is cast to the head's dtype (float32 hidden states with a bf16 head): casting the (V, C) head instead
    # would copy it for every chunk.
    z = (h.to(weight.dtype) @ weight.T).float()  # (n, C) @ (C, V) -> (n, V)
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


class _ChunkedNLL(torch.autograd.Function):
    """Sum of -log softmax(h Wᵀ)[y] over rows, computed chunk by chunk, its gradient computed at the same time.

    The gradient of row i's loss with respect to its logits is softmax(z_i) − onehot(y_i). While a chunk's
    logits are in hand (forward), turning them into that gradient and multiplying by W costs one more matmul;
    keeping only the logsumexp and recomputing the logits in backward would cost two (h Wᵀ again, then g W).
    So forward also returns dloss/dh (N, C) — the size of the hidden states — and backward only scales it by the
    incoming gradient (a scalar: the loss is a sum). The (N, V) logits never exist, only one chunk of them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, softcap, ignore_index, want_grad):
        # hidden (N, C), weight (V, C), targets (N,)
        mask = targets != ignore_index
        targets = targets.masked_fill(~mask, 0)
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # With LoRA the vocabulary head is frozen and this (V, C) buffer is never allocated.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], chunk_size):
            rows = slice(s, s + chunk_size)
            z, t = _chunk_logits(hidden[rows], weight, softcap)  # (n, V)
            lse = torch.logsumexp(z, dim=-1)  # (n,)
            target_logit = z.gather(1, targets[rows, None]).squeeze(1)  # (n,)
            total += ((lse - target_logit) * mask[rows]).sum()
            if not (need_h or need_w):
                continue
            g = z.sub_(lse[:, None]).exp_()  # softmax, in place: (n, V)
            g[torch.arange(len(g), device=g.device), targets[rows]] -= 1  # − onehot(y)
            g.mul_(mask[rows, None])  # ignored rows get no gradient
            if t is not None:
                g.mul_(t.square_().neg_().add_(1))  # d(cap·tanh(x/cap))/dx = 1 − tanh²
            g = g.to(weight.dtype)
            if need_h:
                grad_h[rows] = g @ weight  # (n, V) @ (V, C) -> (n, C), cast to hidden's dtype
            if need_w:
                grad_w += (g.T @ hidden[rows].to(weight.dtype)).float()  # (V, n) @ (n, C) -> (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def chunked_next_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            chunk_size: int = 1024, softcap: float | None = None,
                            ignore_index: int = IGNORE_INDEX,
                            reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss from the final hidden states (..., T, C) and the vocabulary head weight (V, C).

    Equal to `next_token_loss(hidden @ weight.T, labels)` (with soft-capping when `softcap` is set) in value and
    gradient, but at most chunk_size × V float32 logits exist at any time (≈ 2 such buffers): with a 128k
    vocabulary, chunk_size=1024 means 0.5 GB per buffer. Returns (loss, n_tokens) like `next_token_loss`.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    targets = _shifted_targets(labels, ignore_index).reshape(-1)  # (N,) with N = B·T
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, C): a view, no copy, thanks to the padded targets
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)  # not in evaluation
    loss = _ChunkedNLL.apply(h, weight, targets, chunk_size, softcap, ignore_index, want_grad)
    n_tokens = (targets != ignore_index).sum()
    return (loss if reduction == "sum" else loss / n_tokens.clamp(min=1)), n_tokens
