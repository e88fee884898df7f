"""PEFT adapter format both ways, with PEFT itself as the oracle: logits must agree to 1e-4.

transformers' LlamaForCausalLM has the same module names as minilora's model (`model.layers.0.self_attn.q_proj`),
so these tests wrap a transformers model with minilora's LoRA and compare it with the same model under PEFT.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minilora.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter_config, save_adapter
from minilora.errors import MiniloraError
from minilora.lora import LoRALinear, apply_lora

VOCAB = 61


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def randomize(model, seed=1, std=0.2):
    """Random A and B for every LoRA layer, ours or PEFT's (a zero B would hide any mistake in the B path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))

CASES = [  # (targets for apply_lora / LoraConfig, r, alpha, use_rslora)
    (["q_proj", "v_proj"], 4, 8, False),
    ("all-linear", 8, 16, False),
    (["k_proj", "down_proj"], 3, 5, True),  # odd rank and alpha, rsLoRA scaling alpha/√r
    (r"model\.layers\.1\.self_attn\.(q|o)_proj", 2, 32, False),  # a regex: only some layers
]


@pytest.mark.parametrize("targets,r,alpha,rslora", CASES)
def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path, targets, r, alpha, rslora):
    from peft import PeftModel

    ours = tiny_llama()
    names = apply_lora(ours, r=r, alpha=alpha, targets=targets, use_rslora=rslora, dropout=0.1)
    randomize(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny-llama")
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ours.eval()
    base = logits(tiny_llama(), IDS)
    diff = (logits(ours, IDS) - logits(theirs, IDS)).abs().max().item()
    assert diff < 1e-4, diff
    assert (logits(ours, IDS) - base).abs().max() > 1e-2  # the adapter really changes the model
    wrapped = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    assert sorted(wrapped) == sorted(names)


@pytest.mark.parametrize("targets,r,alpha,rslora", CASES)
def test_peft_adapter_loads_in_ours_with_equal_logits(tmp_path, targets, r, alpha, rslora):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                     use_rslora=rslora, lora_dropout=0.05, task_type="CAUSAL_LM"))
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama()
    names = load_adapter(ours, tmp_path)
    diff = (logits(ours.eval(), IDS) - logits(theirs.eval(), IDS)).abs().max().item()
    assert diff < 1e-4, diff
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {f"{n}.{ab}.weight" for n in names for ab in ("lora_A", "lora_B")}


def test_old_pickled_adapter_bin_loads(tmp_path):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize(theirs)
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / WEIGHTS_NAME).exists()
    ours = tiny_llama()
    load_adapter(ours, tmp_path)
    assert (logits(ours, IDS) - logits(theirs.eval(), IDS)).abs().max() < 1e-4


def test_saved_files_use_peft_names(tmp_path):
    from peft import LoraConfig

    model = tiny_llama()
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=True)
    save_adapter(model, tmp_path, base_model_name_or_path="org/base")
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(config) <= set(LoraConfig.__dataclass_fields__)  # every field is one PEFT knows
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules",
                                   "bias", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "use_rslora": True,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "base_model_name_or_path": "org/base"}
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded.r == 4 and loaded.lora_alpha == 8 and set(loaded.target_modules) == {"q_proj", "v_proj"}
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 4)  # 2 kv heads
    assert len(tensors) == 2 * 2 * 2 and all(t.dtype == torch.float32 for t in tensors.values())


def test_some_layers_only_are_saved_as_full_names(tmp_path):
    model = tiny_llama()
    apply_lora(model, targets=r"model\.layers\.0\.mlp\.up_proj")
    save_adapter(model, tmp_path)
    # "up_proj" alone would also select layer 1's up_proj in PEFT, so the full name is written.
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"] == ["model.layers.0.mlp.up_proj"]


def test_round_trip_in_minilora(tmp_path):
    a = tiny_llama()
    apply_lora(a, r=5, alpha=10, targets="all-linear")
    randomize(a)
    save_adapter(a, tmp_path)
    b = tiny_llama()
    load_adapter(b, tmp_path)
    assert torch.equal(logits(a, IDS), logits(b, IDS))


# ---------------------------------------------------------------- mistakes


def saved_adapter(tmp_path, **lora):
    model = tiny_llama()
    apply_lora(model, **({"r": 4, "alpha": 8} | lora))
    save_adapter(model, tmp_path)
    return tmp_path


def edit_config(folder, **fields):
    path = folder / CONFIG_NAME
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def edit_weights(folder, change):
    tensors = load_file(folder / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)


def expect_error(folder, match):
    model = tiny_llama()
    with pytest.raises(MiniloraError, match=match):
        load_adapter(model, folder)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # a failed load leaves the model as it was


def test_missing_folder_or_files(tmp_path):
    expect_error(tmp_path / "nope", "adapter_config.json not found")
    folder = saved_adapter(tmp_path)
    (folder / WEIGHTS_NAME).unlink()
    expect_error(folder, "no weights file")


def test_corrupt_files(tmp_path):
    folder = saved_adapter(tmp_path)
    (folder / WEIGHTS_NAME).write_bytes(b"not safetensors")
    expect_error(folder, "not a readable safetensors file")
    (folder / CONFIG_NAME).write_text("{oops")
    expect_error(folder, "not valid JSON")


@pytest.mark.parametrize("fields,match", [
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern.*not supported"),
    ({"alpha_pattern": {"v_proj": 2}}, "alpha_pattern.*not supported"),
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"init_lora_weights": "pissa"}, "change the base model"),
    ({"r": None}, "'r' is missing"),
    ({"target_modules": ["nonexistent"]}, "match no linear layer"),
])
def test_unsupported_or_bad_config_fields(tmp_path, fields, match):
    folder = saved_adapter(tmp_path)
    edit_config(folder, **fields)
    expect_error(folder, match)


def test_empty_patterns_and_null_lists_are_fine(tmp_path):
    folder = saved_adapter(tmp_path)
    edit_config(folder, rank_pattern={}, alpha_pattern={}, modules_to_save=[], layers_to_transform=None)
    load_adapter(tiny_llama(), folder)
    assert read_adapter_config(folder)["r"] == 4


def test_unknown_missing_and_misshapen_tensors(tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    folder = saved_adapter(tmp_path)
    edit_weights(folder, lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight":
                                             torch.zeros(4, 32)}))
    expect_error(folder, "1 tensor.* match no LoRA layer.*up_proj")
    folder = saved_adapter(tmp_path)
    edit_weights(folder, lambda t: t.pop(key))
    expect_error(folder, "1 tensor.* missing.*q_proj.lora_A")
    folder = saved_adapter(tmp_path)
    edit_weights(folder, lambda t: t.update({key: torch.zeros(4, 31)}))
    expect_error(folder, r"q_proj.lora_A.weight has shape \(4, 31\), the model expects \(4, 32\)")


def test_wrong_rank_in_config(tmp_path):
    folder = saved_adapter(tmp_path)
    edit_config(folder, r=8)
    expect_error(folder, r"has shape \(4, 32\), the model expects \(8, 32\)")


def test_loading_twice_and_saving_without_lora(tmp_path):
    folder = saved_adapter(tmp_path / "a")
    model = tiny_llama()
    load_adapter(model, folder)
    with pytest.raises(MiniloraError, match="already has LoRA"):
        load_adapter(model, folder)
    with pytest.raises(MiniloraError, match="no LoRA layers"):
        save_adapter(tiny_llama(), tmp_path / "b")


def test_saving_merged_or_mixed_layers_is_refused(tmp_path):
    model = tiny_llama()
    apply_lora(model, r=4, targets=["q_proj"])
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(MiniloraError, match="unmerge"):
        save_adapter(model, tmp_path)
    model = tiny_llama()
    apply_lora(model, r=4, targets=["q_proj"])
    apply_lora(model, r=2, targets=["v_proj"])
    with pytest.raises(MiniloraError, match="rank_pattern"):
        save_adapter(model, tmp_path)


def test_a_nested_module_tree_needs_no_transformers(tmp_path):
    """The format is a name filter plus a prefix: any nn.Module with linear layers round-trips."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.ReLU(), Block())
    apply_lora(model, r=2, alpha=2, targets=["proj"])
    randomize(model)
    save_adapter(model, tmp_path)
    assert sorted(load_file(tmp_path / WEIGHTS_NAME))[0] == "base_model.model.0.proj.lora_A.weight"
    torch.manual_seed(0)
    other = nn.Sequential(Block(), nn.ReLU(), Block())
    load_adapter(other, tmp_path)
    x = torch.randn(3, 6)
    assert torch.equal(model(x), other(x))


# ---------------------------------------------------------------- minilora's own model, from a checkpoint

FAMILIES = ["llama", "qwen3", "gemma2", "phi3"]  # plain; tied embeddings; soft-capping; fused qkv / gate_up


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return {f: make_tiny_checkpoint(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


def model_ids():
    return torch.randint(3, 256, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "qkv_proj"], "all-linear"])
def test_adapter_trained_on_our_model_loads_in_peft(tmp_path, checkpoints, family, targets):
    from peft import PeftModel
    from tiny_models import load_hf_model

    from minilora.formats.safetensors_folder import load_model

    ours = load_model(checkpoints[family])
    if isinstance(targets, list):  # phi3 has one fused qkv_proj, the others separate q/k/v
        targets = [t for t in targets if any(n.endswith("." + t) for n, _ in ours.named_modules())]
    names = apply_lora(ours, r=4, alpha=8, targets=targets)
    randomize(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path=str(checkpoints[family]))
    theirs = PeftModel.from_pretrained(load_hf_model(checkpoints[family]), tmp_path).eval()
    ids = model_ids()
    with torch.no_grad():
        ours_logits, base_logits = ours(ids), load_model(checkpoints[family])(ids)
    diff = (ours_logits - logits(theirs, ids)).abs().max().item()
    assert diff < 1e-4, diff
    assert (ours_logits - base_logits).abs().max() > 0.05
    n_peft = sum(1 for _, m in theirs.named_modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    assert n_peft == len(names)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_in_our_model(tmp_path, checkpoints, family):
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf_model

    from minilora.formats.safetensors_folder import load_model

    theirs = get_peft_model(load_hf_model(checkpoints[family]),
                            LoraConfig(r=6, lora_alpha=12, target_modules="all-linear", use_rslora=True))
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_model(checkpoints[family])
    load_adapter(ours, tmp_path)
    ids = model_ids()
    with torch.no_grad():
        diff = (ours(ids) - logits(theirs.eval(), ids)).abs().max().item()
    assert diff < 1e-4, diff
