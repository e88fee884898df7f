"""minilora's Transformer against transformers (the oracle) on tiny random checkpoints of every family.

Tolerances: both sides compute in float32 with the same operation order up to the attention kernel (SDPA here,
eager matmuls there), which moves logits by < 1e-5; 1e-4 leaves room without hiding a real bug (a wrong norm,
rope or mask moves them by > 1e-2). Greedy tokens must be identical: the tiny models' top-2 logit gaps are
> 5e-4 (see tiny_models.py), far above that noise.
"""

import dataclasses

import pytest
import torch
from transformers import GenerationConfig

from minilora.formats.safetensors_folder import load_model
from minilora.generation import generate
from minilora.model import KVCache, build_attention_mask, first_kept_key
from op_recorder import OpRecorder
from tiny_models import EOS, FAMILIES, PAD, load_hf_model, make_tiny_checkpoint

TOL = 1e-4
SLIDING_FAMILIES = ["mistral", "qwen2", "gemma2", "gemma3_text", "phi3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (minilora model, transformers model), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            path = make_tiny_checkpoint(family, tmp_path_factory.mktemp(family))
            cache[family] = (load_model(path), load_hf_model(path))
        return cache[family]

    return get


def random_ids(B, T, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)  # avoid pad/bos/eos ids 0-2


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(models, family):
    ours, hf = models(family)
    ids = random_ids(2, 24)  # 24 tokens: three times the sliding window of 8
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < TOL, f"{family}: max |logits diff| = {diff:.2e}"


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_parity_input_exercises_the_sliding_window(models, family):
    """Guard for the test above: with the window removed, logits change, so parity really covered it."""
    ours, _ = models(family)
    ids = random_ids(2, 24)
    with torch.no_grad():
        windowed = ours(ids)
        window, ours.config.sliding_window = ours.config.sliding_window, 10**6
        try:
            unwindowed = ours(ids)
        finally:
            ours.config.sliding_window = window
    assert torch.allclose(windowed[:, :8], unwindowed[:, :8], atol=TOL)  # within the window: no difference
    assert (windowed[:, 8:] - unwindowed[:, 8:]).abs().max() > 1e-2


def hf_greedy(hf, ids, attention_mask=None, n=20):
    """transformers' greedy decoding: stops a row at eos (2) and pads it with 0 until all rows are done."""
    config = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=EOS, pad_token_id=PAD)
    return hf.generate(ids, attention_mask=attention_mask, generation_config=config)


def our_greedy(ours, ids, attention_mask=None, n=20):
    return generate(ours, ids, max_new_tokens=n, attention_mask=attention_mask, eos_token_ids=[EOS], pad_token_id=PAD)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(models, family):
    ours, hf = models(family)
    ids = random_ids(3, 6, seed=1)
    expected = hf_greedy(hf, ids)
    got = our_greedy(ours, ids)
    assert got.tolist() == expected.tolist()
    assert len(set(got[:, 6:].flatten().tolist())) >= 10  # the continuations are not one repeated token


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_transformers(models, family):
    ours, hf = models(family)
    ids = random_ids(2, 24, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # row 1: 10 pad tokens on the left, 14 real ones
    ids[1, :10] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)  # default positions count real tokens
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        alone = ours(ids[1:, 10:])  # row 1 without its padding
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() < TOL
    if family == "phi3_longrope":
        # Row 0 (24 tokens) is past original_max (16), so the whole batch rotates with the long factors, as in
        # transformers (one choice per forward call); row 1 alone (14 tokens) uses the short ones.
        assert (got[1, 10:] - alone[0]).abs().max() > 1e-2
        with torch.no_grad():
            alone = with_long_factors_only(ours, ids[1:, 10:])
    assert (got[1, 10:] - alone[0]).abs().max() < TOL

    short = ids[:, 14:]  # prompts of 10 and 4 real tokens
    assert our_greedy(ours, short, mask[:, 14:]).tolist() == hf_greedy(hf, short, mask[:, 14:]).tolist()


def with_long_factors_only(ours, ids):
    """A longrope model's logits for ids with its long factors at any length (short_factor set to long_factor)."""
    saved = ours.config.rope
    ours.config.rope = {lt: dataclasses.replace(r, short_factor=r.long_factor) for lt, r in saved.items()}
    try:
        return ours(ids)
    finally:
        ours.config.rope = saved


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phi3_longrope"])  # longrope: tests below
def test_kv_cache_decoding_equals_full_forward(models, family):
    ours, _ = models(family)
    ids = random_ids(2, 20, seed=3)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache()
        steps = [ours(ids[:, :9], kv_cache=cache)]  # prefill 9, then one token at a time across the window
        steps += [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 20)]
    assert cache.seq_len == 20
    assert (torch.cat(steps, dim=1) - full).abs().max() < TOL
    # Sliding layers hold only the window - 1 newest keys (the tiny configs' window is 8); full layers hold all 20.
    cfg = ours.config
    kept = [20 if lt == "full_attention" else cfg.sliding_window - 1 for lt in cfg.layer_types]
    assert [k.shape[2] for k in cache.keys] == kept == [v.shape[2] for v in cache.values]
    if family in ("mistral", "gemma2", "gemma3"):
        assert min(kept) == 7


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("max_len", [None, 40])
def test_preallocated_cache_decodes_across_windows_without_copying_the_past(models, family, max_len):
    """40 tokens (5 windows of 8): prefill 11 (more than a window), then steps of 1, 3 and 2 tokens. The logits
    equal the full forward's; with max_len every layer writes into the buffer it got at prefill (same storage to
    the end: no step reallocates or concatenates), and a sliding layer's buffer stays at two windows (16)."""
    ours, _ = models(family)
    ids = random_ids(2, 40, seed=5)
    cuts = [0, 11] + list(range(12, 20)) + list(range(20, 32, 3)) + list(range(32, 41, 2))
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(max_len=max_len)
        steps, storages = [], None
        for a, b in zip(cuts, cuts[1:]):
            steps.append(ours(ids[:, a:b], kv_cache=cache))
            if storages is None:
                storages = [k.untyped_storage().data_ptr() for k in cache.keys]
    assert cache.seq_len == 40
    assert (torch.cat(steps, dim=1) - full).abs().max() < TOL
    cfg = ours.config
    kept = [40 if lt == "full_attention" else cfg.sliding_window - 1 for lt in cfg.layer_types]
    assert [k.shape[2] for k in cache.keys] == kept == [v.shape[2] for v in cache.values]
    if max_len is not None:
        assert [k.untyped_storage().data_ptr() for k in cache.keys] == storages
        capacity = [40 if lt == "full_attention" else 2 * cfg.sliding_window for lt in cfg.layer_types]
        assert [buf.shape[2] for buf in cache._k] == capacity


def test_a_decoding_step_without_padding_builds_no_mask():
    """One new query sees every key its cache returns (a sliding layer's cache already holds only the window), so no
    mask is built for it; padding, several new tokens or packed segments still get one."""
    for window in (None, 8):
        assert build_attention_mask(1, 30, None, None, window, "cpu", first_kept_key(30, window)) is None
        assert build_attention_mask(3, 30, None, None, 8, "cpu", first_kept_key(30, 8)) is not None
    padding = torch.tensor([[0, 1, 1, 1]])
    mask = build_attention_mask(1, 3, padding, None, None, "cpu")
    assert mask.tolist() == [[[[False, True, True, True]]]]


def op_names() -> OpRecorder:
    """Records the names of the aten ops run inside it."""
    return OpRecorder(lambda func, args, out: func.__name__)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # SDPA's enable_gqa; gemma2: the soft-capped path
def test_grouped_query_attention_never_repeats_keys(models, family):
    ours, _ = models(family)
    assert ours.config.num_attention_heads > ours.config.num_key_value_heads
    ids = random_ids(1, 6)
    with torch.no_grad(), op_names() as ops:
        cache = KVCache()
        ours(ids[:, :5], kv_cache=cache)
        ours(ids[:, 5:], kv_cache=cache)
    assert "_scaled_dot_product_flash_attention_for_cpu.default" in ops.seen or family == "gemma2"
    assert not [n for n in ops.seen if "repeat" in n]  # repeat_interleave / repeat: copies of the K/V heads


@pytest.mark.parametrize("T", [8, 16, 17, 24])
def test_longrope_logits_match_transformers_on_both_sides_of_original_max(models, T):
    """phi3_longrope pre-trained on 16 tokens: up to 16 the short factors rotate, from 17 on the long ones."""
    ours, hf = models("phi3_longrope")
    ids = random_ids(2, T, seed=T)
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < TOL, f"T={T}: max |logits diff| = {diff:.2e}"


def test_longrope_choice_follows_the_whole_sequence(models):
    """The same 16 tokens get other logits once a 17th follows: the long factors then rotate every position."""
    ours, _ = models("phi3_longrope")
    ids = random_ids(1, 17, seed=6)
    with torch.no_grad():
        alone, in_longer = ours(ids[:, :16]), ours(ids)[:, :16]
    assert (alone - in_longer).abs().max() > 1e-2


def test_longrope_kv_cache_switches_like_transformers(models):
    """With a cache, a step past original_max (16) rotates only its own query/key with the long factors; the cached
    keys keep the short ones. transformers' forward does the same, so step logits agree with its cached steps, and
    both differ from a full forward from step 17 on (which is why generate recomputes the cache there)."""
    from transformers import DynamicCache

    ours, hf = models("phi3_longrope")
    ids = random_ids(2, 20, seed=3)
    with torch.no_grad():
        full = ours(ids)  # 20 tokens: all long
        cache, hf_cache = KVCache(), DynamicCache(config=hf.config)
        steps = [ours(ids[:, :9], kv_cache=cache)] + [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 20)]
        hf_steps = [hf(ids[:, :9], past_key_values=hf_cache, use_cache=True).logits]
        hf_steps += [hf(ids[:, t:t + 1], past_key_values=hf_cache, use_cache=True).logits for t in range(9, 20)]
    stepped, hf_stepped = torch.cat(steps, dim=1), torch.cat(hf_steps, dim=1)
    assert (stepped - hf_stepped).abs().max() < TOL
    with torch.no_grad():
        first16 = ours(ids[:, :16])
    assert (stepped[:, :16] - first16).abs().max() < TOL  # up to 16 tokens all short: the cache changes nothing
    assert (stepped[:, 16:] - full[:, 16:]).abs().max() > 1e-2  # from 17 on: short cached keys, long new ones


def test_longrope_generation_equals_full_forward_greedy(models):
    """generate recomputes its cache when the sequence outgrows original_max, so each token is the argmax of a full
    forward over everything so far: prompts of 6 and 17 tokens (short, then long; long from the start)."""
    ours, _ = models("phi3_longrope")
    for T in (6, 17):
        ids = random_ids(2, T, seed=7)
        expected = ids
        with torch.no_grad():
            for _ in range(14):
                expected = torch.cat((expected, ours(expected)[:, -1:].argmax(-1)), dim=1)
        assert generate(ours, ids, max_new_tokens=14, eos_token_ids=[]).tolist() == expected.tolist()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
def test_segment_ids_keep_packed_samples_apart(models, family):
    """Two samples packed in one row give the same logits as each alone (positions restart per segment)."""
    ours, _ = models(family)
    a, b = random_ids(1, 9, seed=4), random_ids(1, 13, seed=5)
    packed = torch.cat((a, b, torch.zeros(1, 2, dtype=torch.long)), dim=1)  # + 2 padding tokens
    segments = torch.tensor([[1] * 9 + [2] * 13 + [0] * 2])
    with torch.no_grad():
        got = ours(packed, segment_ids=segments)
        assert (got[:, :9] - ours(a)).abs().max() < TOL
        assert (got[:, 9:22] - ours(b)).abs().max() < TOL
        # explicit restarted position_ids give the same result as the default derived from segment_ids
        positions = torch.tensor([list(range(9)) + list(range(13)) + [0, 1]])
        assert (ours(packed, segment_ids=segments, position_ids=positions) - got).abs().max() < TOL


def bool_masks(T: int) -> OpRecorder:
    """Records the shapes of the boolean tensors with two trailing dims of T (attention masks) made inside it."""
    return OpRecorder(lambda func, args, out: tuple(out.shape) if isinstance(out, torch.Tensor)
                      and out.dtype == torch.bool and out.shape[-2:] == (T, T) else None)


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2", "gemma3_text"])  # qwen2, gemma3: mixed layers
def test_per_segment_attention_equals_the_dense_mask(models, family):
    """The CUDA path for packed rows, forced on CPU tensors: segments of 1, 15, 16, 17, 40 and padding tokens
    (buckets 16, 32 and 64) give the same logits and gradients as the dense (B, 1, T, T) mask, which is not built
    for full-attention layers (sliding layers keep the mask: is_causal cannot express a window)."""
    ours, _ = models(family)
    T = 58
    ids = random_ids(2, T, seed=8)
    segments = torch.tensor([[1] * 17 + [2] * 40 + [0],
                             [1] * 1 + [2] * 15 + [3] * 16 + [4] * 21 + [0] * 5])
    mask = (segments > 0).long()
    results = {}
    embeddings = ours.model.embed_tokens.weight
    was_trainable = embeddings.requires_grad  # the model is shared by the module's tests: leave it as found
    for per_segment in (False, True):
        ours.per_segment_attention = per_segment
        ours.zero_grad(set_to_none=True)
        embeddings.requires_grad_(True)
        try:
            with bool_masks(T) as masks:
                logits = ours(ids, attention_mask=mask, segment_ids=segments)
            (logits[mask.bool()].square().mean()).backward()
            results[per_segment] = (logits.detach(), embeddings.grad.clone(), masks.seen)
        finally:
            ours.per_segment_attention = None
            embeddings.requires_grad_(was_trainable)
            ours.zero_grad(set_to_none=True)
    real = mask.bool()
    assert (results[True][0][real] - results[False][0][real]).abs().max() < TOL
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)
    assert (2, 1, T, T) in results[False][2]  # the dense path builds it ...
    if "sliding_attention" not in ours.config.layer_types:
        assert results[True][2] == []  # ... the per-segment path does not


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])  # untied, tied, tied + final soft-capping
def test_hidden_states_and_compute_logits(models, family):
    ours, hf = models(family)
    ids = random_ids(2, 12)
    with torch.no_grad():
        hidden = ours(ids, return_hidden=True)  # (B, T, C)
        assert hidden.shape == (2, 12, ours.config.hidden_size)
        assert (ours.compute_logits(hidden) - ours(ids)).abs().max() == 0
    tied = ours.config.tie_word_embeddings
    assert hasattr(ours, "lm_head") != tied
    expected_weight = ours.model.embed_tokens.weight if tied else ours.lm_head.weight
    assert ours.lm_head_weight is expected_weight
    assert torch.equal(ours.lm_head_weight, hf.lm_head.weight)


def test_state_dict_keys_are_hugging_face_names(models):
    ours, hf = models("phi3")
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert isinstance(ours.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)
    ours, hf = models("gemma3_text")
    assert set(ours.state_dict()) == set(hf.state_dict()) - {"lm_head.weight"}  # tied: no separate head


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gradient_checkpointing_gives_the_same_gradients(models, family):
    ours, _ = models(family)
    ids = random_ids(2, 16)

    def grads(checkpointing):
        ours.zero_grad()
        ours.train()
        ours.gradient_checkpointing = checkpointing
        try:
            ours(ids).logsumexp(-1).mean().backward()
        finally:
            ours.gradient_checkpointing = False
            ours.eval()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    ours.zero_grad(set_to_none=True)
    for name in plain:
        assert torch.allclose(plain[name], recomputed[name], atol=1e-6), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3", "phi3_longrope",
                                    "qwen2_yarn"])
def test_bfloat16_matches_transformers_bfloat16(tmp_path, family):
    """bf16 exposes every rounding point (norm order, Gemma's embedding scale, cos/sin): we round where transformers
    does.

    Against transformers' SDPA attention (same kernel as ours) the logits are bit-identical (measured: 0.0).
    Gemma 2 needs the eager oracle (SDPA has no soft-capping) and we soft-cap the final logits in float32 where
    transformers does it in bf16: 1 bf16 ulp apart (measured 1.9e-3 at |logit| < 0.5).
    """
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint(family, tmp_path)
    ours = load_model(path, dtype="bfloat16")
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    softcap = family == "gemma2"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                              attn_implementation="eager" if softcap else "sdpa")
    ids = random_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits.float()
    assert (got - expected)[mask.bool()].abs().max() <= (4e-3 if softcap else 1e-6)
