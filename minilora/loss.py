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
idea of Liger-Kernel's fused linear cross-entropy, without the fusion). Rows whose target is -100 are skipped
before the vocabulary projection: they cost nothing, so an SFT batch whose prompts are half its tokens pays
half the loss's matmuls. Gemma-2-style logit soft-capping
(cap · tanh(z / cap)) is supported.

Not handled: label smoothing, z-loss, a bias on the vocabulary head, tensor-parallel vocabularies.
"""

import torch

from . import cpu_matmul

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


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None, out: torch.Tensor | None):
    """Float32 logits (n, V) of the hidden rows h (n, C), written into `out` (n, V), and tanh(raw / cap) when
    soft-capping (else None).

    `out` is one buffer reused by every chunk: a fresh (n, V) tensor per chunk is a fresh mmap of tens of MB whose
    pages the kernel must fault in and zero — measured 44 ms of a 54 ms log_softmax at 512 × 49152 on one core.
    `out` None: oneDNN multiplies (float32 on the CPU, cpu_matmul.py) into a tensor of its own, fresh pages and all:
    111 ms against MKL's 215 ms into the buffer at 256 × 576 × 49152.
    """
    # h is cast to the head's dtype (float32 hidden states with a bf16 head): casting the (V, C) head instead
    # would copy it for every chunk.
    h = h.to(weight.dtype)
    if out is None:
        out = cpu_matmul.linear(h, weight)  # (n, C) @ (C, V) -> (n, V)
    elif weight.dtype == torch.float32:
        torch.mm(h, weight.T, out=out)  # (n, C) @ (C, V) -> (n, V), straight into the buffer
    else:
        out.copy_(h @ weight.T)  # a 16-bit product, widened to float32 once
    if softcap is None:
        return out, None
    t = torch.tanh(out / softcap)
    return torch.mul(t, softcap, out=out), t


class _ChunkedNLL(torch.autograd.Function):
    """Sum of -log softmax(h Wᵀ)[y] over the counted rows, chunk by chunk, its gradient computed at the same time.

    Only rows whose target is counted are projected: in SFT every prompt token is labelled -100, and each
    sequence's last position predicts nothing, so with half the targets masked the two vocabulary matmuls (the
    bulk of the loss's work) shrink by half. Ignored rows get a zero gradient, which is what they would get anyway.

    The gradient of row i's loss with respect to its logits is softmax(z_i) − onehot(y_i). While a chunk's
    logits are in hand (forward), turning them into that gradient and multiplying by W costs one more matmul;
    keeping only the logsumexp and recomputing the logits in backward would cost two (h Wᵀ again, then g W).
    So forward also returns dloss/dh (N, C) — the size of the hidden states — and backward only scales it by the
    incoming gradient (a scalar: the loss is a sum). The (N, V) logits never exist, only one chunk of them.

    Passes over a chunk's (n, V) floats: the matmul writes them; one in-place log_softmax (max, sum of exp and
    the subtraction in one kernel, a row at a time, so the row stays in cache); the targets' -log p are gathered;
    one in-place exp_ turns log p into p = the gradient, then -1 at the targets. torch.logsumexp followed by
    z - lse and exp (the previous version) made 4-5 passes and allocated a full-size temporary.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, softcap, ignore_index, want_grad):
        # hidden (N, C), weight (V, C), targets (N,)
        # The counted rows' indices; on a GPU this is one host sync per call (nonzero's size is data-dependent).
        counted = (targets != ignore_index).nonzero().squeeze(1)  # (M,)
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None  # ignored rows stay 0
        # With LoRA the vocabulary head is frozen and this (V, C) buffer is never allocated.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        M, V = counted.shape[0], weight.shape[0]
        # Each chunk of h is cast to the head's dtype, so the head alone decides; oneDNN brings its own output.
        onednn = cpu_matmul.uses_onednn(weight, weight)
        buffer = None if onednn else torch.empty(min(chunk_size, M), V, dtype=torch.float32, device=hidden.device)
        for s in range(0, M, chunk_size):
            # The previous chunk's (n, V) logits go before this chunk's are made: oneDNN's are a new tensor per
            # chunk, and two alive at once measured 48 MB more at SmolLM2's peak (full fine-tuning, B 4, T 256).
            z = t = log_p = g = None
            rows = counted[s:s + chunk_size]  # (n,)
            h = hidden[rows]  # (n, C), a gather of the counted rows
            y = targets[rows, None]  # (n, 1)
            z, t = _chunk_logits(h, weight, softcap, None if onednn else buffer[:len(rows)])  # (n, V)
            log_p = torch._log_softmax(z, 1, False, out=z)  # in place: log softmax(z), (n, V)
            total -= log_p.gather(1, y).sum()
            if not (need_h or need_w):
                continue
            g = log_p.exp_()  # softmax, in place: (n, V)
            g.scatter_add_(1, y, torch.full_like(y, -1, dtype=g.dtype))  # − onehot(y)
            if t is not None:
                g.mul_(t.square_().neg_().add_(1))  # d(cap·tanh(x/cap))/dx = 1 − tanh²
            g = g.to(weight.dtype)
            if need_h:
                grad_h[rows] = cpu_matmul.linear(g, weight.T).to(grad_h.dtype)  # (n, V) @ (V, C) -> (n, C)
            if need_w and weight.dtype == torch.float32:  # full fine-tuning: accumulated in place, no (V, C) temporary
                cpu_matmul.accumulate_at_b_(grad_w, g, h.to(weight.dtype))  # += (V, n) @ (n, C)
            elif need_w:
                grad_w += (g.T @ h.to(weight.dtype)).float()  # (V, n) @ (n, C) -> (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        # The saved gradients are scaled in place: a copy of grad_w (V, C) would be alive beside it at the start of
        # backward, when every activation is too (113 MB more at the peak for SmolLM2's tied head in full FT).
        # So this backward can run once per forward.
        if ctx.used:
            raise RuntimeError("chunked_next_token_loss: a second backward through the same loss (retain_graph) is "
                               "not supported; compute the loss again")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def chunked_next_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            chunk_size: int = 256, softcap: float | None = None,
                            ignore_index: int = IGNORE_INDEX,
                            reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss from the final hidden states (..., T, C) and the vocabulary head weight (V, C).

    Equal to `next_token_loss(hidden @ weight.T, labels)` (with soft-capping when `softcap` is set) in value and
    gradient, but at most chunk_size × V float32 logits exist at any time (one buffer, two with soft-capping):
    with a 128k vocabulary, chunk_size=256 means 131 MB per buffer. 256 rows keep the vocabulary matmul at this
    CPU's GEMM rate with a 4x smaller buffer than 1024 rows: the loss's forward + backward (1024 tokens, one
    thread, CPU time, 5 interleaved rounds) took 0.91 s vs 0.97 s with C 512, V 32,000, and 1.53 s vs 1.52 s
    with SmolLM2's C 576, V 49,152 (both through MKL). Only the counted rows (target != -100) are projected to the
    vocabulary. Returns (loss, n_tokens) like `next_token_loss`.
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
