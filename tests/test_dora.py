"""DoRA (dora.py) against its formula and against PEFT (`use_dora=True`), the oracle.

Every comparison uses random A, B and m (at initialisation B = 0 and m = ‖W0‖, which would make DoRA equal the base
model and hide any mistake in the magnitude or direction path).
"""

import pytest
import torch
from torch import nn

from minilora.adapter import load_adapter, save_adapter
from minilora.dora import DoRALinear
from minilora.lora import apply_lora, merge_lora


def randomize(model, seed=1, std=0.2):
    """Random A, B and magnitude for every adapted layer, ours or PEFT's (same names in sorted order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def test_forward_is_the_papers_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = DoRALinear(base, r=3, alpha=5.0)
    randomize(layer)
    x = torch.randn(4, 12)
    W0, A, B, m, s = base.weight, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, 5.0 / 3
    V = W0 + s * B @ A  # (7, 12)
    W = m[:, None] * V / V.norm(dim=1, keepdim=True)  # W' = m · V / ‖V‖, norm per output row
    expected = x @ W.T + base.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_initial_model_is_the_base_and_magnitude_is_the_row_norm():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = DoRALinear(base, r=2, alpha=4.0)
    x = torch.randn(3, 10)
    assert torch.allclose(layer.lora_magnitude_vector, base.weight.norm(dim=1))
    assert torch.allclose(layer(x), base(x), atol=1e-6)


def test_norm_is_a_constant_in_backward():
    """Gradients equal those of the formula with ‖W0 + s·BA‖ detached (DoRA §4.3), not the full derivative."""
    torch.manual_seed(0)
    base = nn.Linear(8, 5, bias=False)
    layer = DoRALinear(base, r=2, alpha=2.0)
    randomize(layer)
    x = torch.randn(6, 8)
    layer(x).square().sum().backward()
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_(True)
    V = base.weight + 1.0 * B @ A
    W = m[:, None] * V / V.norm(dim=1, keepdim=True).detach()
    (x @ W.T).square().sum().backward()
    for ours, ref in ((layer.lora_A.weight, A), (layer.lora_B.weight, B), (layer.lora_magnitude_vector, m)):
        assert torch.allclose(ours.grad, ref.grad, rtol=1e-5, atol=1e-6)
    V2 = (base.weight + B @ A).detach().requires_grad_(False)
    assert not torch.allclose(V2, base.weight)  # B is random: the direction really moved


def test_merge_and_unmerge():
    torch.manual_seed(0)
    base = nn.Linear(9, 4)
    layer = DoRALinear(base, r=2, alpha=3.0)
    randomize(layer)
    x = torch.randn(5, 9)
    before, w0 = layer(x), base.weight.detach().clone()
    layer.merge()
    assert torch.allclose(layer(x), before, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(base.weight, w0, atol=1e-6)
    assert torch.allclose(layer(x), before, atol=1e-5)


def test_any_frozen_base_nf4_included():
    """DoRA over a 4-bit NF4Linear equals DoRA over an nn.Linear holding the dequantized weight (QDoRA)."""
    from minilora.quant.nf4_linear import NF4Linear

    torch.manual_seed(0)
    dense = nn.Linear(128, 64)
    four_bit = NF4Linear.from_linear(dense, backend="torch")
    with torch.no_grad():
        dense.weight.copy_(four_bit.dequantize(torch.float32))
    ours_4bit, ours_dense = DoRALinear(four_bit, r=4, alpha=8.0), DoRALinear(dense, r=4, alpha=8.0)
    randomize(ours_4bit)
    randomize(ours_dense)
    x = torch.randn(3, 128)
    assert torch.allclose(ours_4bit(x), ours_dense(x), atol=1e-5)
    merged = merge_lora(nn.Sequential(ours_4bit))[0]
    assert isinstance(merged, nn.Linear) and torch.allclose(merged(x), ours_dense(x), atol=1e-5)


# --- PEFT interop on every supported family -------------------------------------------------------------------

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return {f: make_tiny_checkpoint(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


def model_ids():
    return torch.randint(3, 256, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_our_dora_adapter_loads_in_peft(tmp_path, checkpoints, family):
    from peft import PeftModel
    from tiny_models import load_hf_model

    from minilora.dora import DoRALinear
    from minilora.formats import load_model

    ours = load_model(checkpoints[family])
    names = apply_lora(ours, r=4, alpha=8, targets="all-linear", layer=DoRALinear)
    randomize(ours)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(load_hf_model(checkpoints[family]), tmp_path).eval()
    ids = model_ids()
    with torch.no_grad():
        ours_logits, theirs_logits = ours(ids), theirs(ids).logits
        base_logits = load_model(checkpoints[family])(ids)
    assert (ours_logits - theirs_logits).abs().max().item() <= 1e-5
    assert (ours_logits - base_logits).abs().max() > 0.05
    n_dora = sum(1 for _, m in theirs.named_modules() if hasattr(m, "lora_magnitude_vector") and m.use_dora["default"])
    assert n_dora == len(names)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_dora_adapter_loads_in_ours_and_merges(tmp_path, checkpoints, family):
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf_model
    from transformers import AutoModelForCausalLM

    from minilora.formats import load_model, save_model

    theirs = get_peft_model(load_hf_model(checkpoints[family]),
                            LoraConfig(r=6, lora_alpha=12, target_modules="all-linear", use_dora=True))
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_model(checkpoints[family])
    load_adapter(ours, tmp_path / "adapter")
    ids = model_ids()
    with torch.no_grad():
        ours_logits = ours(ids)
        assert (ours_logits - theirs.eval()(ids).logits).abs().max().item() <= 1e-5
    # Merged: an ordinary checkpoint that transformers reads, with the unmerged model's logits.
    save_model(merge_lora(ours), tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - ours_logits).abs().max().item() <= 1e-4


def test_training_step_matches_peft(checkpoints):
    """Loss and the gradients of A, B and m after one backward equal PEFT's on the same weights and batch."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf_model

    from minilora.formats import load_model
    from minilora.loss import next_token_loss

    path = checkpoints["llama"]
    theirs = get_peft_model(load_hf_model(path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            use_dora=True, lora_dropout=0.0))
    ours = load_model(path)
    apply_lora(ours, r=4, alpha=8, targets="all-linear", layer=DoRALinear)
    randomize(theirs)
    randomize(ours)
    ids = model_ids()
    labels = ids.clone()
    labels[:, :5] = -100
    ours.train()
    theirs.train()
    our_loss, _ = next_token_loss(ours(ids), labels)
    their_loss = theirs(input_ids=ids, labels=labels).loss
    assert abs(our_loss.item() - their_loss.item()) <= 1e-5 * abs(their_loss.item())
    our_loss.backward()
    their_loss.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    theirs_grads = {n.replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): g for n, g in theirs_grads.items()}
    assert set(ours_grads) == set(theirs_grads) and any("magnitude" in n for n in ours_grads)
    for name, g in ours_grads.items():
        ref = theirs_grads[name]
        assert (g - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-7, name


# --- the trainer: --method dora / qdora ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dora", "qdora"])
def test_trainer_dora_learns_saves_and_resumes(tmp_path, method):
    """A short DoRA (or QDoRA) run lowers the validation loss, saves a use_dora adapter whose magnitudes moved,
    and a resumed run ends with exactly the uninterrupted run's loss."""
    import json

    from safetensors.torch import load_file
    from tiny_models import make_tiny_checkpoint

    from minilora.train import train
    from minilora.train_config import TrainConfig

    model = make_tiny_checkpoint("llama", tmp_path / "model", tokenizer="llama3")
    data = tmp_path / "data.txt"
    data.write_text("The river runs past the old mill and the children count the boats.\n\n" * 30)
    base = dict(model=str(model), data=str(data), block_size=32, batch_size=4, r=4, alpha=8, lr=5e-3,
                warmup_steps=1, max_steps=6, eval_every=3, seed=0, device="cpu", method=method, dropout=0.0,
                schedule="constant")  # constant: the 3-step first half then has the same learning rates
    final = train(TrainConfig(**base, output=str(tmp_path / "run")))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert final["val_loss"] < records[0]["val_loss"] - 0.05
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    magnitudes = [k for k in weights if k.endswith("lora_magnitude_vector")]
    assert config["use_dora"] is True and len(magnitudes) == len(weights) // 3
    # Resume from step 3 of a second run: the same final loss as the uninterrupted run.
    train(TrainConfig(**{**base, "max_steps": 3}, output=str(tmp_path / "again"), save_every=3))
    resumed = train(TrainConfig(**base, output=str(tmp_path / "again"), resume="latest"))
    assert resumed["val_loss"] == pytest.approx(final["val_loss"], abs=1e-6)
