"""packed_weights.py: oneDNN-packed weights give the model's own logits, for every family, and are never stale.

Oracles: the same minilora model without packing (its logits equal transformers' in test_model.py) and
transformers' greedy generate. The packed product sums the same float32 terms in another order, so logits agree
to float32 rounding (measured <= 2e-6 on these tiny models; TOL is test_model.py's 1e-4).
"""

import pytest
import torch
from torch import nn

from minilora.formats.safetensors_folder import load_model
from minilora.generation import generate
from minilora.lora import apply_lora, merge_lora
from minilora.model import KVCache
from minilora.packed_weights import (_CACHE, STACKED, packed_bytes, packed_linears, packing_available,
                                     release_packed)
from tiny_models import FAMILIES, load_hf_model, make_tiny_checkpoint

TOL = 1e-4
pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(family, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            path = make_tiny_checkpoint(family, tmp_path_factory.mktemp(family), **overrides)
            cache[key] = (load_model(path), path)
        return cache[key]

    return get


def random_ids(B, T, seed=0, vocab=256):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def linear_forwards_overridden(model) -> int:
    return sum("forward" in vars(m) for m in model.modules() if isinstance(m, nn.Linear))


def stacked_linears(model) -> int:
    """Linears multiplied inside a packed stack (q|k|v, gate|up): the stand-ins packed_linears adds to modules."""
    return sum(len(vars(m)[name].linears) for m in model.modules() for name in STACKED if name in vars(m))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phi3_longrope"])
def test_packed_decoding_equals_the_unpacked_full_forward(models, family):
    """Prefill + one token at a time through packed weights (sliding windows crossed) == the plain forward."""
    ours, _ = models(family)
    ids = random_ids(2, 20, seed=3)
    with torch.no_grad():
        full = ours(ids)
        with packed_linears(ours):
            n_linears = sum(isinstance(m, nn.Linear) for m in ours.modules())
            assert linear_forwards_overridden(ours) + stacked_linears(ours) == n_linears
            per_layer = (0 if ours.config.fused_qkv else 3) + (0 if ours.config.fused_gate_up else 2)
            assert stacked_linears(ours) == per_layer * len(ours.model.layers)  # q|k|v and gate|up: one product each
            packed_full = ours(ids)
            cache = KVCache()
            steps = [ours(ids[:, :9], kv_cache=cache)]
            steps += [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 20)]
    assert linear_forwards_overridden(ours) == stacked_linears(ours) == 0  # every module is as it was
    assert (packed_full - full).abs().max() < TOL
    assert (torch.cat(steps, dim=1) - full).abs().max() < TOL


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_packed_generate_equals_transformers_greedy(models, family):
    from transformers import GenerationConfig

    ours, path = models(family)
    hf = load_hf_model(path)
    ids = random_ids(2, 7, seed=5)
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, ids, 12, eos_token_ids=[]).tolist() == hf.generate(ids, generation_config=config).tolist()


def test_tied_head_is_packed_inside_and_released_after(models):
    ours, _ = models("llama", tie_word_embeddings=True)
    ids = random_ids(1, 10)
    with torch.no_grad():
        plain = ours(ids)
        with packed_linears(ours):
            assert ours.packed_head is not None and ours.packed_head.is_mkldnn
            packed = ours(ids)
    assert ours.packed_head is None
    assert (packed - plain).abs().max() < TOL


def test_a_changed_weight_is_packed_again(models):
    """In-place changes (an optimizer step, merge) and a new tensor both invalidate the cached packed copy."""
    ours, _ = models("llama")
    ids = random_ids(1, 10)
    q = ours.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        with packed_linears(ours):
            before = ours(ids)
        q.weight.mul_(1.5)  # in place: the version counter moves
        with packed_linears(ours):
            after_inplace = ours(ids)
        expected_inplace = ours(ids)
        q.weight.data = q.weight.data / 1.5  # a new storage
        with packed_linears(ours):
            after_new = ours(ids)
        expected_new = ours(ids)
    assert (after_inplace - before).abs().max() > 1e-2  # the change matters, so a stale copy would show
    assert (after_inplace - expected_inplace).abs().max() < TOL
    assert (after_new - expected_new).abs().max() < TOL


def test_lora_attached_after_packing_and_merged_is_followed(models):
    """Generate before and after attaching an adapter, and after merging it: each matches the unpacked model."""
    _, path = models("qwen2")
    ours = load_model(path)
    ids = random_ids(1, 9, seed=7)
    with torch.no_grad():
        with packed_linears(ours):
            ours(ids)  # the base weights are now packed and cached
        apply_lora(ours, r=4, alpha=8, dropout=0.0, targets="all-linear")
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1)  # a non-zero adapter: it changes the logits
        plain = ours(ids)
        with packed_linears(ours):
            with_lora = ours(ids)
        merge_lora(ours)
        merged_plain = ours(ids)
        with packed_linears(ours):
            merged = ours(ids)
    assert (with_lora - plain).abs().max() < TOL
    assert (merged - merged_plain).abs().max() < TOL


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_lora_layers_multiply_base_and_a_in_one_packed_product(models, adapter):
    """Inside the context an unmerged LoRALinear runs base and A as one stacked product (its own stand-in; the
    base, A and B get no packed forward of their own); DoRA keeps its own forward over packed linears. Prefill and
    decoding steps equal the unpacked full forward, q/k/v biases included (Qwen2)."""
    from minilora.dora import DoRALinear
    from minilora.lora import LoRALinear

    _, path = models("qwen2")
    ours = load_model(path)
    apply_lora(ours, r=4, alpha=8, dropout=0.1, targets="all-linear",
               layer=DoRALinear if adapter == "dora" else None)
    ours.eval()  # dropout off, as in generate on an eval()'d model
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    layers = [m for m in ours.modules() if isinstance(m, LoRALinear)]
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        full = ours(ids)
        with packed_linears(ours):
            stand_ins = [type(vars(m).get("forward")).__name__ for m in layers]
            inner_packed = sum("forward" in vars(p) for m in layers for p in (m.base, m.lora_A, m.lora_B))
            cache = KVCache()
            steps = [ours(ids[:, :7], kv_cache=cache)] + [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 12)]
        assert all("forward" not in vars(m) for m in layers)
    if adapter == "lora":
        assert stand_ins == ["_PackedLoRA"] * len(layers) and inner_packed == 0
    else:
        assert stand_ins == ["NoneType"] * len(layers) and inner_packed == 3 * len(layers)
    assert (torch.cat(steps, dim=1) - full).abs().max() < TOL


def test_a_nested_context_leaves_the_outer_stand_ins_in_place(models):
    """generate inside a block that already packs (a chat loop's helper, say): leaving the inner context must not
    undo the outer one's LoRA stand-ins or stacks, and the logits stay the unpacked model's."""
    _, path = models("llama")
    ours = load_model(path)
    apply_lora(ours, r=4, alpha=8, targets=["q_proj", "o_proj"])
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    ids = random_ids(1, 8, seed=9)
    with torch.no_grad():
        plain = ours(ids)
        with packed_linears(ours):
            outer = [type(vars(m).get("forward")).__name__ for m in ours.modules()]
            with packed_linears(ours):
                inner = ours(ids)
            assert [type(vars(m).get("forward")).__name__ for m in ours.modules()] == outer
            assert "_PackedLoRA" in outer and stacked_linears(ours) == 2 * len(ours.model.layers)  # gate|up
            after = ours(ids)
    assert (inner - plain).abs().max() < TOL and (after - plain).abs().max() < TOL


def test_packing_is_off_where_it_does_not_apply(models):
    ours, path = models("llama")
    assert not packing_available(ours)  # gradient mode on: the packed op has no backward
    with packed_linears(ours):
        assert linear_forwards_overridden(ours) == 0
    with torch.no_grad():
        assert packing_available(ours)
        bf16 = load_model(path, dtype=torch.bfloat16)
        assert not packing_available(bf16)  # bf16 keeps F.linear (and its rounding)
        with packed_linears(bf16):
            assert linear_forwards_overridden(bf16) == 0


def test_release_packed_drops_the_copies(models):
    ours, _ = models("llama", tie_word_embeddings=True)
    release_packed(ours)
    assert packed_bytes(ours) == 0
    generate(ours, random_ids(1, 4), 2, eos_token_ids=[])
    dense = sum(m.weight.nbytes for m in ours.modules() if isinstance(m, nn.Linear))
    # every linear + the tied head; oneDNN's blocks pad a tiny matrix's rows (k/v: 32 rows here, measured +9%)
    assert dense + ours.model.embed_tokens.weight.nbytes <= packed_bytes(ours) <= 1.5 * (
        dense + ours.model.embed_tokens.weight.nbytes)
    release_packed(ours)
    assert not any(m in _CACHE for m in ours.modules()) and packed_bytes(ours) == 0


@pytest.mark.parametrize("mode", ["base", "sft"])
def test_training_samples_leave_no_packed_copies(models, mode):
    """The trainer's before/after samples generate, then training goes on for many steps: the packed copies
    (a second copy of every weight) must not stay in memory through it."""
    from types import SimpleNamespace

    from minilora.progress import sample
    from minilora.tokenizer import load_tokenizer

    from tiny_tokenizers import set_chat_template

    ours, path = models("llama", tokenizer="llama3")
    set_chat_template(path, "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    release_packed(ours)
    tokenizer = load_tokenizer(path)
    cfg = SimpleNamespace(mode=mode, sample_tokens=3)
    texts = sample(ours, tokenizer, ["hello", "tea"], cfg, torch.device("cpu"))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert packed_bytes(ours) == 0


def test_no_packing_when_the_copies_would_not_fit_in_memory(models, monkeypatch):
    """Half the available memory must hold a copy of the float32 weights; with less, generate multiplies the
    plain weights and gives the same tokens, packing nothing."""
    import minilora.packed_weights as pw

    ours, _ = models("llama")
    release_packed(ours)
    weight_bytes = sum(p.numel() * 4 for p in ours.parameters())
    ids = random_ids(1, 8, seed=5)
    packed_tokens = generate(ours, ids, 6, eos_token_ids=[])
    assert packed_bytes(ours) > 0
    release_packed(ours)
    monkeypatch.setattr(pw, "available_memory_bytes", lambda: 2 * weight_bytes - 1)  # one byte short
    with torch.no_grad():
        assert not packing_available(ours)
    assert torch.equal(generate(ours, ids, 6, eos_token_ids=[]), packed_tokens)
    assert packed_bytes(ours) == 0
    monkeypatch.setattr(pw, "available_memory_bytes", lambda: 2 * weight_bytes)  # just enough
    with torch.no_grad():
        assert packing_available(ours)


def test_copies_already_packed_do_not_count_against_the_memory_left(models, monkeypatch):
    """The first generate's copies hold memory the second must not ask for again: with too little left for a fresh
    copy, a model whose weights are packed already keeps using them."""
    import minilora.packed_weights as pw

    ours, _ = models("llama")
    release_packed(ours)
    weight_bytes = sum(p.numel() * 4 for p in ours.parameters())
    generate(ours, random_ids(1, 8, seed=6), 2, eos_token_ids=[])
    held = packed_bytes(ours)
    assert held > 0
    monkeypatch.setattr(pw, "available_memory_bytes", lambda: 2 * (weight_bytes - held))  # just the rest
    with torch.no_grad():
        assert packing_available(ours)
        release_packed(ours)
        assert not packing_available(ours)  # a fresh copy of everything would not fit
    release_packed(ours)


def test_available_memory_is_read_from_proc_meminfo():
    import minilora.packed_weights as pw

    available = pw.available_memory_bytes()
    try:
        text = open("/proc/meminfo").read()
    except OSError:
        assert available is None
        return
    kb = int(next(line for line in text.splitlines() if line.startswith("MemAvailable:")).split()[1])
    assert abs(available - kb * 1024) < 64 * 2**20  # read a moment apart: within 64 MB
