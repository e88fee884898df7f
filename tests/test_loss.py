"""The next-token loss against F.cross_entropy, the chunked loss against the plain one, its memory, and
gradient accumulation normalised by the total token count."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minilora.loss import chunked_next_token_loss, count_target_tokens, next_token_loss
from op_recorder import OpRecorder


def make_labels(B, T, V, seed=0, ignore_frac=0.3, ignored_rows=()):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    for row in ignored_rows:
        labels[row] = -100  # e.g. a sample whose response was truncated away
    kept = next(row for row in range(B) if row not in ignored_rows)
    labels[kept, -1] = V - 1  # at least one counted token (the all-ignored case has its own test)
    return labels


def reference(logits, labels, reduction="mean"):
    """PyTorch's cross-entropy on the shifted, flattened tensors."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction=reduction)


SHAPES = [  # (B, T, V)
    (2, 16, 97),  # small, prime vocabulary
    (1, 2, 5),  # a single predicted position
    (3, 33, 1000),  # odd length
    (4, 8, 32000),  # a real vocabulary size (llama-2)
]


@pytest.mark.parametrize("B,T,V", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_cross_entropy_float32(B, T, V, reduction):
    torch.manual_seed(0)
    logits = (torch.randn(B, T, V) * 3).requires_grad_()
    labels = make_labels(B, T, V, ignored_rows=(0,) if B > 1 else ())
    loss, n = next_token_loss(logits, labels, reduction=reduction)
    expected = reference(logits, labels, reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert n.item() == (labels[:, 1:] != -100).sum().item() == count_target_tokens(labels)
    (g,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert torch.all(g[:, -1] == 0)  # the last position predicts nothing


@pytest.mark.parametrize("B,T,V", SHAPES[:3])
def test_bf16_logits_are_reduced_in_float32(B, T, V):
    torch.manual_seed(0)
    logits = (torch.randn(B, T, V) * 8).to(torch.bfloat16)
    labels = make_labels(B, T, V)
    loss, _ = next_token_loss(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference(logits.float(), labels), rtol=1e-5, atol=1e-5)
    # A logsumexp in bf16 would be off by far more than float32 rounding (checked where there are enough terms):
    if V < 50:
        return
    bf16_lse = torch.logsumexp(logits[:, :-1], -1).float()
    assert (bf16_lse - torch.logsumexp(logits[:, :-1].float(), -1)).abs().max() > 1e-3


def test_nothing_counted_is_zero_not_nan():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss, n = next_token_loss(logits, labels)
    assert n.item() == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
    assert torch.isnan(reference(logits, labels))  # what F.cross_entropy gives instead


def test_hand_computed_value():
    # Uniform logits over V tokens: every counted token costs log V.
    logits = torch.zeros(1, 4, 8)
    labels = torch.tensor([[5, 1, -100, 7]])
    loss, n = next_token_loss(logits, labels)
    assert n.item() == 2 and loss.item() == pytest.approx(torch.log(torch.tensor(8.0)).item())


def test_first_label_is_never_a_target():
    logits = torch.randn(1, 4, 8)
    a = torch.tensor([[3, 1, 2, 7]])
    b = torch.tensor([[-100, 1, 2, 7]])
    assert torch.equal(next_token_loss(logits, a)[0], next_token_loss(logits, b)[0])


# ---------------------------------------------------------------- chunked


def plain(hidden, weight, labels, softcap=None, reduction="sum"):
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return next_token_loss(logits, labels, reduction=reduction)


CHUNKED = [  # (B, T, C, V, chunk_size)
    (2, 16, 32, 97, 7),  # chunks that do not divide B·T
    (1, 9, 8, 5, 1),  # one row per chunk
    (3, 20, 16, 300, 1024),  # a single chunk larger than B·T
    (2, 32, 24, 1000, 32),  # chunk = T
]


@pytest.mark.parametrize("B,T,C,V,chunk", CHUNKED)
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chunked_equals_plain_value_and_gradients(B, T, C, V, chunk, softcap, reduction):
    torch.manual_seed(0)
    hidden = torch.randn(B, T, C, requires_grad=True)
    weight = (torch.randn(V, C) / C**0.5).requires_grad_()
    labels = make_labels(B, T, V, ignored_rows=(B - 1,) if B > 1 else ())
    loss, n = chunked_next_token_loss(hidden, weight, labels, chunk_size=chunk, softcap=softcap,
                                      reduction=reduction)
    ref, n_ref = plain(hidden, weight, labels, softcap, reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert n.item() == n_ref.item()
    upstream = torch.tensor(0.7)  # a non-unit incoming gradient, as from dividing by the token count
    g_h, g_w = torch.autograd.grad(loss * upstream, (hidden, weight))
    r_h, r_w = torch.autograd.grad(ref * upstream, (hidden, weight))
    torch.testing.assert_close(g_h, r_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_w, r_w, rtol=1e-5, atol=1e-6)


def test_chunked_bf16_matches_plain_bf16():
    torch.manual_seed(0)
    B, T, C, V = 2, 24, 32, 500
    hidden = torch.randn(B, T, C, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, C) / C**0.5).to(torch.bfloat16)  # frozen head, as with LoRA
    labels = make_labels(B, T, V)
    loss, _ = chunked_next_token_loss(hidden, weight, labels, chunk_size=10)
    ref, _ = plain(hidden, weight, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)  # same bf16 matmul, float32 reduction
    (g,) = torch.autograd.grad(loss, hidden)
    (r,) = torch.autograd.grad(ref, hidden)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-3)  # bf16 rounding of grad_logits


def test_chunked_float32_hidden_with_a_bf16_head():
    """The trainer passes float32 hidden states; a bf16-loaded model has a bf16 head. The chunk is cast to the
    head's dtype (casting the (V, C) head would copy it once per chunk)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 16, requires_grad=True)
    weight = (torch.randn(50, 16) / 4).to(torch.bfloat16)
    labels = make_labels(2, 12, 50)
    loss, _ = chunked_next_token_loss(hidden, weight, labels, chunk_size=5)
    ref, _ = plain(hidden.to(torch.bfloat16), weight, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    (g,) = torch.autograd.grad(loss, hidden)
    (r,) = torch.autograd.grad(ref, hidden)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, r.float(), rtol=2e-2, atol=2e-3)


def test_chunked_all_ignored():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    loss, n = chunked_next_token_loss(hidden, torch.randn(16, 8), torch.full((2, 4), -100), reduction="mean")
    loss.backward()
    assert n.item() == 0 and loss.item() == 0 and torch.count_nonzero(hidden.grad) == 0


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created inside the mode and their peak.

    Every op's outputs are seen here; a weakref finaliser on each storage subtracts its bytes when the storage
    is freed (including tensors autograd saved for backward). Inputs created before the mode are not counted.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()

    def _freed(self, key, nbytes):
        self.storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.storages:  # views share their base's storage
                    self.storages.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


def peak_bytes(loss_fn, hidden, weight, labels):
    hidden = hidden.detach().requires_grad_()
    with LiveTensorBytes() as tracker:
        loss, _ = loss_fn(hidden, weight, labels)
        loss.backward()
        del loss
    return tracker.peak


def test_tracker_sees_a_known_allocation():
    with LiveTensorBytes() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more
        del a, b
        c = torch.zeros(250)  # 1000, after both were freed
    assert tracker.peak == 8000 and tracker.live == 1000
    del c


def test_chunked_memory_stays_bounded_while_plain_grows():
    """Forward + backward of the loss with a frozen head (the LoRA case): N = 1024 tokens, C = 64, chunk = 64.

    Plain: the (N, V) float32 logits, the logsumexp temporary and the logits' gradient are alive together: at
    least 2·N·V·4 bytes (measured 5.1·N·V·4 = 316 MiB at V = 16000). Chunked: a few (chunk, V) buffers plus the
    (N, C) hidden gradient (measured 3.1·chunk·V·4 = 12 MiB at V = 16000, 26× less); it does not grow with N.
    """
    N, C, chunk = 1024, 64, 64
    chunked = lambda h, w, y: chunked_next_token_loss(h, w, y, chunk_size=chunk)  # noqa: E731
    peaks = {}
    for V in (1000, 4000, 16000):
        torch.manual_seed(0)
        hidden, weight, labels = torch.randn(1, N, C), torch.randn(V, C) / 8, make_labels(1, N, V)
        peaks[V] = (peak_bytes(plain, hidden, weight, labels), peak_bytes(chunked, hidden, weight, labels))
        naive, ours = peaks[V]
        assert naive >= 2 * N * V * 4  # the full logits exist
        assert ours <= 4 * chunk * V * 4 + 4 * N * C * 4  # only chunk-sized logits do
    # As the vocabulary grows 16×, the plain path's peak grows with N·V; the chunked one stays below
    # what the plain path needs for the smallest vocabulary.
    assert peaks[16000][0] > 12 * peaks[1000][0]
    assert peaks[16000][1] < peaks[1000][0]
    # And the chunked peak does not depend on the number of tokens (only the (N, C) terms do).
    V = 16000
    hidden, weight = torch.randn(1, 4 * N, C), torch.randn(V, C) / 8
    longer = peak_bytes(chunked, hidden, weight, make_labels(1, 4 * N, V))
    assert longer - peaks[V][1] <= 4 * (3 * N * C * 4) + 4 * (3 * N * 4)  # growth = hidden-sized terms only


# ---------------------------------------------------------------- gradient accumulation


def test_accumulation_over_unequal_micro_batches_equals_one_big_batch():
    """Sum the micro-batch loss sums, divide by the total count: every token weighs the same however the batch
    is split. A tiny causal model (embedding → mixing over earlier positions → head) so padding matters."""
    torch.manual_seed(0)
    V, C = 23, 16

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix, self.head = nn.Embedding(V, C), nn.Linear(C, C), nn.Linear(C, V, bias=False)

        def forward(self, ids):
            h = self.emb(ids).cumsum(1)  # (B, T, C): position t sees tokens ≤ t, never the padding after it
            return self.head(torch.tanh(self.mix(h)))

    model = Tiny()
    g = torch.Generator().manual_seed(1)
    lengths = [3, 11, 6, 9, 2]
    seqs = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    labels = [s.clone() for s in seqs]
    labels[2][:4] = -100  # a prompt that is not trained on

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    # One big batch, right-padded to the longest, padding labelled -100, mean over counted tokens.
    T = max(lengths)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    big_labels = torch.full((len(seqs), T), -100)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)], big_labels[i, :len(y)] = s, y
    big, n_big = next_token_loss(model(ids), big_labels)
    expected = grads(big)

    # Micro-batches of unequal length (1, 2 and 2 sequences), each padded to its own longest.
    groups = [[0], [1, 2], [3, 4]]
    micro = []
    for group in groups:
        t = max(lengths[i] for i in group)
        mid = torch.zeros(len(group), t, dtype=torch.long)
        my = torch.full((len(group), t), -100)
        for row, i in enumerate(group):
            mid[row, :lengths[i]], my[row, :lengths[i]] = seqs[i], labels[i]
        micro.append((mid, my))
    total = sum(count_target_tokens(y) for _, y in micro)
    assert total == n_big.item()
    model.zero_grad()
    for mid, my in micro:
        loss_sum, _ = chunked_next_token_loss(
            torch.tanh(model.mix(model.emb(mid).cumsum(1))), model.head.weight, my, chunk_size=4)
        (loss_sum / total).backward()  # gradients add up across micro-batches
    accumulated = [p.grad.clone() for p in model.parameters()]
    for a, e in zip(accumulated, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)

    # The tempting alternative — average the micro-batch means — weighs tokens unequally and differs.
    model.zero_grad()
    for mid, my in micro:
        (next_token_loss(model(mid), my)[0] / len(micro)).backward()
    assert max((p.grad - e).abs().max().item() for p, e in zip(model.parameters(), expected)) > 1e-3


# ---------------------------------------------------------------- only counted rows are projected


def oracle(hidden, weight, labels, softcap=None):
    """F.cross_entropy (sum) over the full (B·T, V) logits of the shifted targets: nothing skipped."""
    logits = hidden.float() @ weight.float().T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    V = weight.shape[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def masked_labels(B, T, V, case):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, V, (B, T), generator=g)
    if case == "half masked":  # an SFT batch: the first half of every row is prompt
        labels[:, :T // 2] = -100
    elif case == "a chunk all masked":  # rows 0 and 1 (the first chunks of B·T positions) entirely ignored
        labels[:2] = -100
    return labels  # "none masked": every target counted (only each row's last position predicts nothing)


@pytest.mark.parametrize("case", ["half masked", "a chunk all masked", "none masked"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_counted_rows_only_equals_cross_entropy(case, softcap):
    torch.manual_seed(0)
    B, T, C, V, chunk = 4, 12, 16, 301, 5  # chunk does not divide the number of counted rows
    hidden = torch.randn(B, T, C, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(V, C) / C**0.5).requires_grad_()
    labels = masked_labels(B, T, V, case)
    loss, n = chunked_next_token_loss(hidden, weight, labels, chunk_size=chunk, softcap=softcap)
    ref = oracle(hidden, weight, labels, softcap)
    assert n.item() == (labels[:, 1:] != -100).sum().item()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    g_h, g_w = torch.autograd.grad(loss * 0.3, (hidden, weight))
    r_h, r_w = torch.autograd.grad(ref * 0.3, (hidden, weight))
    torch.testing.assert_close(g_h, r_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_w, r_w, rtol=1e-5, atol=1e-6)
    ignored = torch.cat([labels[:, 1:] == -100, torch.ones(B, 1, dtype=torch.bool)], 1)  # (B, T) targets ignored
    assert torch.all(g_h[ignored] == 0) and torch.any(g_h[~ignored] != 0)


def matmul_rows(V: int) -> OpRecorder:
    """Records the rows M of every (M, K) @ (K, N) product whose N is the vocabulary size: torch.mm (MKL), or
    oneDNN's linear (cpu_matmul.py), whose weight is (N, K)."""
    def rows_into_vocabulary(func, args, out):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out) and args[1].shape[-1] == V:
            return args[0].shape[0]
        if func == torch.ops.mkldnn._linear_pointwise.default and args[1].shape[0] == V:
            return args[0].shape[0]
        return None
    return OpRecorder(rows_into_vocabulary)


def test_masked_rows_are_not_projected():
    """Half the targets masked -> the vocabulary matmuls see only the counted rows (hand count: 4 × 6)."""
    B, T, C, V = 4, 12, 8, 97
    hidden = torch.randn(B, T, C, requires_grad=True)
    labels = masked_labels(B, T, V, "half masked")  # labels 6..11 of each row: 6 targets
    with matmul_rows(V) as rows:
        loss, n = chunked_next_token_loss(hidden, torch.randn(V, C), labels, chunk_size=7)
    assert n.item() == 24 and sum(rows.seen) == 24 and max(rows.seen) == 7
