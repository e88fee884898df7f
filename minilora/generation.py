"""Text generation: KV-cache decoding with greedy, temperature, top-k and top-p sampling, and streaming.

Decoding runs the prompt once (prefill), keeping each layer's keys and values in a KVCache (a sliding-window
layer only its last window), then feeds one new token per step, so each step costs O(current length) instead of
re-running the whole sequence. Batches may be left-padded: the attention mask hides the padding and positions
count real tokens only, so a padded row generates exactly what it would alone.

LongRoPE models (Phi-3-128k, Phi-3.5) rotate with one factor list up to original_max tokens and another beyond
(rope.py), chosen per forward call for the whole batch. The cached keys of a generation that grows past
original_max were rotated with the short list, so at the step where the (padded) sequence first exceeds
original_max the whole sequence is run again, filling a fresh cache with the long one: from then on every step
sees what a full forward of the sequence would. transformers' Phi-3 does the same (its
`prepare_inputs_for_generation` drops the cache at that step). Difference: minilora does it for any family whose
config asks for longrope, transformers only for Phi-3 (a Llama or Qwen config with longrope keeps its short-rotated
cache there). And since one choice covers the batch, a left-padded row whose batch crosses original_max is not
generated exactly as it would be alone.

Sampling (applied in this order, as transformers does):
- temperature T: logits / T (T = 0 means greedy: always the most likely token);
- top-k (Fan et al. 2018): keep the k most likely tokens;
- top-p / nucleus (Holtzman et al. 2019): keep the smallest set of most likely tokens whose probability reaches p.

The command `python -m minilora.generate` (generate.py) sits on top of this module; the chat loop (chat.py) too.

Not handled: beam search, repetition penalties, batched prompts on the command line.
"""

import sys

import torch

from .errors import MiniloraError
from .model import KVCache
from .packed_weights import packed_linears


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_ids=None, attention_mask=None, generator=None, stream=None,
             pad_token_id: int | None = None) -> torch.Tensor:
    """Continue `input_ids` ((T,), (B, T) tensor or a list of ids); return (B, T + new) token ids.

    eos_token_ids: int or list; a row stops at any of them (default: the model config's eos_token_id; [] = never).
    attention_mask: (B, T) 1/0 for left-padded batches. generator: a seeded torch.Generator for sampling.
    stream: called with each step's new tokens (B,) as they are chosen.
    pad_token_id: written after a row's eos while other rows go on (default: its first eos id, else 0).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    ids = ids[None] if ids.ndim == 1 else ids  # (B, T)
    eos = torch.tensor(_eos_list(model, eos_token_ids), dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask, device=device).long()

    with packed_linears(model):  # CPU float32: the weights in oneDNN's layout for this call (packed_weights.py)
        return _decode(model, ids, mask, max_new_tokens, temperature, top_k, top_p, eos, pad, generator, stream)


def _decode(model, ids, mask, max_new_tokens, temperature, top_k, top_p, eos, pad, generator, stream):
    """generate's loop: prefill, then one token per step until max_new_tokens or every row hit an eos."""
    B, device = ids.shape[0], ids.device
    # Without padding no mask is needed: the prefill is plain causal, and a step's one query sees every cached key.
    if bool(mask.all()):
        mask = None  # else (B, S): left padding to hide
    cache = KVCache(max_len=ids.shape[1] + max_new_tokens)  # buffers sized once: no step copies the past
    logits = prefill(model, ids, mask, cache)  # (B, V)
    rope_switches = longrope_switch_lengths(model.config)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens = []
    for _ in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        token = torch.where(finished, pad, token)
        new_tokens.append(token)
        if stream is not None:
            stream(token)
        finished |= torch.isin(token, eos)
        if finished.all():
            break
        if mask is not None:
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)  # (B, S + 1)
        length = ids.shape[1] + len(new_tokens)  # S + 1: the sequence with this step's token
        if any(cache.seq_len <= n < length for n in rope_switches):  # the sequence just outgrew n tokens
            cache = KVCache(max_len=ids.shape[1] + max_new_tokens)
            logits = prefill(model, torch.cat((ids, torch.stack(new_tokens, dim=1)), dim=1), mask, cache)
        else:
            logits = model(token[:, None], attention_mask=mask, kv_cache=cache)[:, -1]  # one token per row: (B, V)
    if not new_tokens:
        return ids
    return torch.cat((ids, torch.stack(new_tokens, dim=1)), dim=1)


def prefill(model, ids: torch.Tensor, mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """Run the whole sequence ids (B, T) into an empty cache; return the last position's logits (B, V).

    Only the last position's logits are needed, so just that row is projected to the vocabulary (a (T, C) x (C, V)
    product would be most of the prefill's work for a long prompt).
    """
    hidden = model(ids, attention_mask=mask, kv_cache=cache, return_hidden=True)  # (B, T, C)
    return model.compute_logits(hidden[:, -1])  # (B, V)


def longrope_switch_lengths(config) -> set[int]:
    """The original_max of each LongRoPE layer type: lengths past which its rotation changes (empty otherwise)."""
    ropes = (config.rope[lt] for lt in set(config.layer_types))
    return {r.original_max_position_embeddings for r in ropes if r.rope_type == "longrope"}


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row of logits (B, V): argmax if temperature == 0, else sample the filtered softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept)."""
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches p; set the rest to -inf.

    A token is dropped when the tokens ranked above it already hold >= p, so the most likely one always stays.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # probability of the strictly better-ranked tokens
    drop_sorted = mass_above >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if max_new_tokens < 0:
        raise MiniloraError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise MiniloraError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise MiniloraError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise MiniloraError(f"top_p must be in (0, 1], got {top_p}")


def _eos_list(model, eos_token_ids) -> list[int]:
    if eos_token_ids is None:
        eos_token_ids = model.config.eos_token_id
    if eos_token_ids is None:
        return []
    return [int(eos_token_ids)] if isinstance(eos_token_ids, int) else [int(i) for i in eos_token_ids]


class TextStreamer:
    """Print generated text as it comes: decode everything so far and print what is new.

    Decoding one token at a time would break characters whose UTF-8 bytes span several tokens (byte-level BPE),
    so the text is re-decoded and printing waits while it ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout  # resolved now: tests and shells swap sys.stdout
        self.ids: list[int] = []
        self.printed = 0  # characters already printed

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._write(text)

    def end(self) -> None:
        self._write(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)
