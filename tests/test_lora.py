"""LoRALinear, apply_lora, merge_lora, count_parameters: against the paper's formula, PEFT and transformers."""

import math

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from minilora import cpu_matmul
from minilora.errors import MiniloraError
from minilora.lora import (LoRALinear, add_lora, apply_lora, count_parameters, linear_names, merge_lora,
                           parameter_summary)
from op_recorder import OpRecorder

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed=0, layers=2):
    """A random transformers Llama with the module tree minilora's model shares (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def randomize_lora(model, seed=1, std=0.2):
    """Non-zero A and B (B starts at zero, which would hide any mistake in the B path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * std)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


class FakeNF4Linear(nn.Module):
    """Stands in for NF4Linear: a frozen linear whose weight is stored as integers plus a scale (no float
    `weight`), with dequantize() — all LoRALinear and merge_lora may rely on."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.scale = weight.abs().max() / 7
        self.register_buffer("qweight", torch.round(weight / self.scale).to(torch.int8))
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)

    def dequantize(self, dtype=None) -> torch.Tensor:
        return (self.qweight.float() * self.scale).to(dtype or torch.float32)

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)


# ---------------------------------------------------------------- the layer

SHAPES = [  # (d_in, d_out, r, x shape prefix)
    (32, 48, 4, (2, 5)),  # llama-like: batch, time
    (7, 13, 1, (3,)),  # awkward: odd sizes, rank 1, 2-D input
    (64, 64, 16, (1, 1, 9)),  # square, r = d/4, extra leading dim
    (5, 3, 8, (4,)),  # r larger than both dimensions (allowed, just wasteful)
]


@pytest.mark.parametrize("d_in,d_out,r,prefix", SHAPES)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_is_the_paper_formula(d_in, d_out, r, prefix, use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    layer = LoRALinear(base, r=r, alpha=16, use_rslora=use_rslora)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(*prefix, d_in)
    scale = 16 / math.sqrt(r) if use_rslora else 16 / r
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + base.bias + scale * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.scale == scale and layer(x).shape == (*prefix, d_out)


def test_init_matches_peft_and_starts_at_the_base_model():
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(40, 24)

        def forward(self, x):
            return self.q_proj(x)

    base, our_base = One(), nn.Linear(40, 24)
    torch.manual_seed(123)
    peft_model = get_peft_model(base, LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj"]))
    torch.manual_seed(123)
    ours = LoRALinear(our_base, r=6, alpha=12)
    torch.testing.assert_close(ours.lora_A.weight, peft_model.base_model.model.q_proj.lora_A["default"].weight,
                               rtol=0, atol=0)
    # Kaiming-uniform with a=√5 is U(-1/√d_in, 1/√d_in); B = 0 so step 0 is the base model exactly.
    bound = 1 / math.sqrt(40)
    assert ours.lora_A.weight.abs().max() <= bound and ours.lora_A.weight.abs().max() > 0.8 * bound
    assert torch.count_nonzero(ours.lora_B.weight) == 0
    x = torch.randn(3, 40)
    with torch.no_grad():  # evaluation: the base's own F.linear, plus exactly zero
        assert torch.equal(ours(x), ours.base(x))
    # Training (FrozenLinearLoRA): the base product through oneDNN on the CPU (cpu_matmul), plus exactly zero.
    assert torch.equal(ours(x), cpu_matmul.linear(x, ours.base.weight, ours.base.bias))


def test_only_A_and_B_train_and_step_zero_gradients():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    x = torch.randn(5, 16)
    layer(x).square().sum().backward()
    # With B = 0: dL/dA = scale·Bᵀ(...) = 0, and dL/dB = scale·g (xAᵀ) ≠ 0, so B moves first.
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0
    g = 2 * layer(x).detach()  # dL/dy
    torch.testing.assert_close(layer.lora_B.weight.grad, layer.scale * g.T @ (x @ layer.lora_A.weight.T))
    assert layer.base.weight.grad is None


def test_lora_params_stay_float32_beside_a_bf16_base():
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + layer.scale * (x.float() @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)  # bf16 output rounding (8 bits)
    bf = LoRALinear(nn.Linear(8, 8), r=2, alpha=2, dtype=torch.bfloat16)
    assert bf.lora_A.weight.dtype == torch.bfloat16 and bf(torch.randn(2, 8)).dtype == torch.float32


def test_dropout_only_in_training_and_only_on_the_lora_path():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 64)
    no_dropout = layer.base(x) + layer.scale * layer.lora_B(layer.lora_A(x))
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout)
    layer.train()
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)  # the same draw nn.Dropout makes with this seed
    torch.manual_seed(1)
    y = layer(x)
    torch.testing.assert_close(y, layer.base(x) + layer.scale * layer.lora_B(layer.lora_A(dropped)))
    assert not torch.allclose(y, no_dropout)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_merge_unmerge_keep_outputs(dtype, tol):
    torch.manual_seed(0)
    base = nn.Linear(48, 40).to(dtype)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(6, 48, dtype=dtype)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight.float(), (w0.float() + layer.delta_weight()).to(dtype).float())
    torch.testing.assert_close(layer(x), before, rtol=tol, atol=tol)
    layer.merge()  # a second merge is a no-op, not a double add
    torch.testing.assert_close(layer(x), before, rtol=tol, atol=tol)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=tol, atol=tol)
    torch.testing.assert_close(layer(x), before, rtol=tol, atol=tol)


def test_train_and_eval_never_merge():
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4)
    w0 = layer.base.weight.detach().clone()
    nn.init.normal_(layer.lora_B.weight)
    layer.eval()
    layer.train()
    assert not layer.merged and torch.equal(layer.base.weight, w0)


def test_quantized_base_by_composition():
    torch.manual_seed(0)
    base = FakeNF4Linear(torch.randn(24, 40), torch.randn(24))
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 40)
    expected = x @ base.dequantize().T + base.bias + layer.scale * x @ layer.delta_weight().T / layer.scale
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(MiniloraError, match="merge_lora"):
        layer.merge()  # no float weight to add ΔW to


# ---------------------------------------------------------------- injection into a model


def test_apply_lora_default_targets_and_freezing():
    model = tiny_llama()
    names = apply_lora(model, r=4, alpha=8)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.{ab}.weight" for n in names for ab in ("lora_A", "lora_B")]
    assert isinstance(model.model.layers[1].self_attn.v_proj, LoRALinear)
    assert isinstance(model.model.layers[1].self_attn.k_proj, nn.Linear)


def test_all_linear_never_touches_the_head_or_embeddings():
    model = tiny_llama()
    names = apply_lora(model, targets="all-linear")
    parent = {p: "self_attn" for p in LLAMA_LINEARS[:4]} | {p: "mlp" for p in LLAMA_LINEARS[4:]}
    assert sorted(names) == sorted(f"model.layers.{i}.{parent[p]}.{p}" for i in range(2) for p in LLAMA_LINEARS)
    assert isinstance(model.lm_head, nn.Linear) and not model.lm_head.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad
    assert linear_names(model) == []  # nothing left to wrap, and LoRA's own A/B are not candidates


def test_all_linear_equals_peft():
    from peft import LoraConfig, get_peft_model

    ours, theirs = tiny_llama(), tiny_llama()
    names = apply_lora(ours, targets="all-linear")
    peft_model = get_peft_model(theirs, LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"))
    assert sorted(names) == sorted(peft_model.peft_config["default"].target_modules)


def test_targets_as_regex_and_as_suffix_list():
    model = tiny_llama()
    names = apply_lora(model, targets=r"model\.layers\.1\.mlp\.(up|down)_proj")
    assert names == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    model = tiny_llama()
    assert apply_lora(model, targets=["mlp.gate_proj"]) == [f"model.layers.{i}.mlp.gate_proj" for i in range(2)]


@pytest.mark.parametrize("targets", [["qproj"], "q_proj", ["q_proj", "nope"], "lm_head", ["embed_tokens"]])
def test_targets_that_match_nothing_list_the_available_names(targets):
    model = tiny_llama()
    with pytest.raises(MiniloraError, match="available: .*'q_proj'"):
        apply_lora(model, targets=targets)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("r,targets", [(4, ("q_proj", "v_proj")), (8, "all-linear"), (1, ["down_proj"])])
def test_trainable_count_is_sum_of_r_times_din_plus_dout(r, targets):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    _, total_before = count_parameters(model)
    dims = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = apply_lora(model, r=r, targets=targets)
    trainable, total = count_parameters(model)
    assert trainable == sum(r * (dims[n][0] + dims[n][1]) for n in names)
    assert total == total_before + trainable
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=r, target_modules=targets if isinstance(targets, str)
                                                         else list(targets)))
    assert (trainable, total) == peft_model.get_nb_trainable_parameters()
    assert parameter_summary(model) == (f"trainable params: {trainable:,} || all params: {total:,} || "
                                        f"trainable%: {100 * trainable / total:.4f}")


def test_count_parameters_counts_a_quantized_base_as_its_weights():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(FakeNF4Linear(torch.randn(24, 40), torch.randn(24)), r=4, alpha=8))
    assert count_parameters(model) == (4 * (40 + 24), 24 * 40 + 24 + 4 * (40 + 24))


def test_add_lora_is_apply_lora_with_peft_argument_names():
    model = tiny_llama()
    assert add_lora(model, r=2, alpha=4, target_modules=["o_proj"]) == [f"model.layers.{i}.self_attn.o_proj"
                                                                         for i in range(2)]


# ---------------------------------------------------------------- merge_lora


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_merge_lora_gives_a_plain_model_with_the_same_logits(targets):
    model = tiny_llama()
    apply_lora(model, r=4, alpha=8, targets=targets)
    randomize_lora(model)
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        before = model(ids).logits
        merge_lora(model)
        after = model(ids).logits
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_llama().state_dict())  # HF's keys: saveable as a checkpoint
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_merge_lora_dequantizes_a_quantized_base():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(FakeNF4Linear(torch.randn(24, 40), torch.randn(24)), r=4, alpha=8))
    nn.init.normal_(model[0].lora_B.weight, std=0.1)
    x = torch.randn(5, 40)
    before = model(x)
    merge_lora(model)
    assert type(model[0]) is cpu_matmul.Linear and model[0].weight.dtype == torch.float32
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_merge_lora_after_merge_does_not_add_twice():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(16, 8), r=2, alpha=4))
    nn.init.normal_(model[0].lora_B.weight)
    x = torch.randn(3, 16)
    before = model(x)
    model[0].merge()
    merge_lora(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- minilora's own model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_all_linear_on_our_model_matches_peft_on_transformers(tmp_path, family):
    """Same checkpoint: our all-linear names and parameter counts equal PEFT's on transformers' model (qwen3 ties
    its head to the embeddings, phi3 fuses qkv_proj and gate_up_proj)."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf_model, make_tiny_checkpoint

    from minilora.formats.safetensors_folder import load_model

    path = make_tiny_checkpoint(family, tmp_path)
    ours = load_model(path)
    names = apply_lora(ours, r=4, alpha=8, targets="all-linear")
    theirs = get_peft_model(load_hf_model(path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert sorted(names) == sorted(theirs.peft_config["default"].target_modules)
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    x = torch.randint(3, 256, (1, 9))
    with torch.no_grad():  # B = 0: the wrapped model is still exactly the base model
        torch.testing.assert_close(ours(x), load_model(path)(x), rtol=0, atol=0)


# ---------------------------------------------------------------- QLoRA: minilora's NF4Linear as the base


@pytest.mark.parametrize("compute_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lora_around_nf4_linear(compute_dtype, tol):
    from minilora.quant.nf4_linear import NF4Linear

    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    base = NF4Linear.from_linear(linear, compute_dtype=compute_dtype, backend="torch")
    model = nn.Sequential(LoRALinear(base, r=8, alpha=16))
    layer = model[0]
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(4, 128)
    w0 = base.dequantize(torch.float32)
    expected = x @ w0.T + base.bias.float() + layer.scale * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    y = model(x)
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
    y.sum().backward()
    assert layer.lora_B.weight.grad is not None and base.bias.grad is None
    assert count_parameters(model) == (8 * (128 + 96), 128 * 96 + 96 + 8 * (128 + 96))
    with pytest.raises(MiniloraError, match="merge_lora"):
        layer.merge()
    merge_lora(model)
    assert type(model[0]) is cpu_matmul.Linear and model[0].weight.dtype == compute_dtype
    torch.testing.assert_close(model(x.to(compute_dtype)).float(), y.detach().float(), rtol=tol, atol=tol)


def test_injected_layers_follow_the_models_train_or_eval_mode():
    # A model loaded for inference is in eval mode; LoRA added to it (e.g. load_adapter for generation) must not
    # apply dropout, so the output is deterministic.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    apply_lora(model, r=2, alpha=4, dropout=0.5, targets=["0"])
    torch.nn.init.normal_(model[0].lora_B.weight)
    x = torch.randn(3, 8)
    assert not model[0].training
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout active in training


def activation_ops(lead: torch.Size) -> OpRecorder:
    """Records the names of the aten ops that take or make a tensor with the activation's leading dims `lead`
    (N tokens, any width)."""

    def pick(func, args, out):
        tensors = [t for t in tree_flatten((args, out))[0] if isinstance(t, torch.Tensor)]
        if any(t.shape[:-1] == lead or t.shape[:1] == (lead.numel(),) for t in tensors):
            return func.__name__
        return None

    return OpRecorder(pick)


def test_autocast_lora_forward_has_no_dtype_round_trip_and_one_fused_addmm():
    """bf16 base under bf16 autocast (the GPU set-up, run here on CPU): the activation is never converted (casting
    it to float32 made autocast cast it back: 2 conversions forward + 2 backward), × scale and + y are one addmm.
    The result equals the float32 computation up to bf16 rounding."""
    torch.manual_seed(0)
    base = nn.Linear(64, 96, bias=False).to(torch.bfloat16)  # no bias: the base is a plain mm, not an addmm
    lora = LoRALinear(base, r=8, alpha=16)
    nn.init.normal_(lora.lora_B.weight, std=0.1)
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    lead = torch.Size((4, 16))
    with activation_ops(lead) as forward:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lora(x)
    with activation_ops(lead) as backward:
        y.sum().backward()
    assert y.dtype == torch.bfloat16
    assert "_to_copy.default" not in forward.seen + backward.seen, (forward.seen, backward.seen)
    assert forward.seen.count("addmm.default") == 1
    assert "mul.Tensor" not in forward.seen and "add.Tensor" not in forward.seen, forward.seen
    xf = x.detach().float()
    expected = base.float()(xf) + 2.0 * xf @ lora.lora_A.weight.T @ lora.lora_B.weight.T
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=5e-2)
