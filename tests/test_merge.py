"""Merging: merge_lora + save_model writes a checkpoint transformers loads with the unmerged model's logits;
`python -m minilora.merge` does it from the shell and fails with one line on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilora.adapter import load_adapter, save_adapter
from minilora.formats.safetensors_folder import load_model, save_model
from minilora.errors import run_cli
from minilora.lora import LoRALinear, apply_lora, merge_lora
from minilora.merge import main

REPO = Path(__file__).resolve().parents[1]
IDS = torch.randint(3, 256, (2, 15), generator=torch.Generator().manual_seed(0))


def randomize(model, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_logits(path, ids=IDS, dtype=torch.float32):
    from tiny_models import load_hf_model

    with torch.no_grad():
        return load_hf_model(path, dtype=dtype)(ids).logits.float()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return {
        "llama": make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), tokenizer="llama3"),
        "qwen3": make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3")),  # tied embeddings
        "phi3": make_tiny_checkpoint("phi3", tmp_path_factory.mktemp("phi3")),  # fused qkv_proj, gate_up_proj
        "gemma2": make_tiny_checkpoint("gemma2", tmp_path_factory.mktemp("gemma2")),
    }


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    """One random all-linear adapter per family, saved by minilora, and the unmerged model's logits."""
    out = {}
    for family, path in checkpoints.items():
        model = load_model(path)
        apply_lora(model, r=4, alpha=8, targets="all-linear")
        randomize(model)
        folder = save_adapter(model, tmp_path_factory.mktemp(f"{family}-adapter"))
        with torch.no_grad():
            out[family] = (folder, model(IDS))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2"])
def test_merged_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, checkpoints, adapters, family):
    _, unmerged = adapters[family]
    model = load_model(checkpoints[family])
    load_adapter(model, adapters[family][0])
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    save_model(model, tmp_path)
    diff = (hf_logits(tmp_path) - unmerged).abs().max().item()
    assert diff < 1e-4, diff
    assert (hf_logits(tmp_path) - hf_logits(checkpoints[family])).abs().max() > 0.05  # the merge changed it


def test_merge_on_the_transformers_model_equals_peft_merge_and_unload(tmp_path):
    """merge_lora works on any module tree, here transformers' own model, and agrees with PEFT's merge."""
    from peft import PeftModel
    from tiny_models import load_hf_model, make_tiny_checkpoint

    base = make_tiny_checkpoint("llama", tmp_path / "base")
    model = load_hf_model(base)
    apply_lora(model, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    randomize(model)
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        unmerged = model(IDS).logits
    merge_lora(model).save_pretrained(tmp_path / "merged")
    peft_merged = PeftModel.from_pretrained(load_hf_model(base), tmp_path / "adapter").merge_and_unload()
    with torch.no_grad():
        theirs = peft_merged(IDS).logits
    assert (hf_logits(tmp_path / "merged") - unmerged).abs().max() < 1e-4
    assert (hf_logits(tmp_path / "merged") - theirs).abs().max() < 1e-4


def test_cli_merges_a_peft_adapter(tmp_path, checkpoints):
    """The shell command on an adapter PEFT wrote; the output folder is complete (tokenizer files too)."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf_model

    base = checkpoints["llama"]
    peft_model = get_peft_model(load_hf_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model.eval()(IDS).logits
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "minilora.merge", "--model", str(base), "--adapter",
                             str(tmp_path / "adapter"), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "merged 4 LoRA layers" in result.stdout
    assert (hf_logits(tmp_path / "out") - expected).abs().max() < 1e-4
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes()
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes left no temporary files


def test_cli_bfloat16_output(tmp_path, checkpoints, adapters):
    folder, _ = adapters["llama"]
    assert run_cli(main, ["--model", str(checkpoints["llama"]), "--adapter", str(folder),
                          "--output", str(tmp_path), "--dtype", "bfloat16"]) == 0
    merged = load_model(tmp_path)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    # Each merged weight went through two bf16 roundings (relative error ≤ 2^-8 each: 8 significant bits): W0
    # when the base was read in bf16, then W0 + ΔW. So it is within 2^-8·(|W0| + |W|) of the float32 merge.
    w0 = load_model(checkpoints["llama"]).state_dict()
    reference = load_model(checkpoints["llama"])
    load_adapter(reference, folder)
    w32 = merge_lora(reference).state_dict()
    for name, w in merged.state_dict().items():
        bound = 2**-8 * (w0[name].abs() + w32[name].abs()) * 1.001
        assert ((w.float() - w32[name]).abs() <= bound).all(), name
    # transformers reads the bf16 checkpoint as minilora does (both run in float32 here).
    with torch.no_grad():
        ours = load_model(tmp_path, dtype=torch.float32)(IDS)
    assert (hf_logits(tmp_path) - ours).abs().max() < 1e-4


def test_cli_errors_are_one_line(tmp_path, checkpoints, adapters, capsys):
    base, (adapter, _) = checkpoints["llama"], adapters["llama"]
    cases = [
        (["--model", str(tmp_path / "missing"), "--adapter", str(adapter)], "model folder not found"),
        (["--model", str(base), "--adapter", str(tmp_path / "missing")], "adapter_config.json not found"),
        (["--model", str(base), "--adapter", str(adapters["phi3"][0])], "match no linear layer"),
        (["--model", str(base), "--adapter", str(adapter), "--output", str(base)], "overwrite the base"),
    ]
    for args, message in cases:
        if "--output" not in args:
            args = args + ["--output", str(tmp_path / "out")]
        assert run_cli(main, args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing written when the inputs are wrong


def test_cli_exit_status_from_the_shell(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "minilora.merge", "--model", str(tmp_path / "nope"),
                             "--adapter", str(tmp_path), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


# --- QLoRA adapters: how far a 16-bit merge is from the trained model, and --base nf4 -------------------------

@pytest.fixture(scope="module")
def qlora_adapter(checkpoints, tmp_path_factory):
    """A QLoRA adapter as the trainer writes it (4-bit NF4 base, a few steps at a high learning rate)."""
    from minilora.train import train
    from minilora.train_config import TrainConfig

    root = tmp_path_factory.mktemp("qlora-run")
    (root / "data.txt").write_text(("The river runs past the old mill.\n\n강물은 방앗간 옆을 흐른다.\n\n") * 10)
    train(TrainConfig(model=str(checkpoints["llama"]), data=str(root / "data.txt"), method="qlora", r=4, alpha=8,
                      block_size=16, batch_size=4, lr=5e-2, warmup_steps=0, max_steps=3, eval_every=0,
                      output=str(root / "run"), device="cpu", dropout=0.0))
    return root / "run" / "adapter"


def merge_note(capsys, argv) -> float:
    assert run_cli(main, argv) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, notes  # printed once
    return float(notes[0].split("at most ")[1].split(" ")[0]), notes[0]


def test_merging_a_qlora_adapter_says_how_far_it_is_from_the_trained_model(tmp_path, checkpoints, qlora_adapter,
                                                                           capsys):
    from minilora.config import load_config

    base = checkpoints["llama"]
    assert json.loads((qlora_adapter / "minilora_base.json").read_text())["base_quantization"] == "nf4"
    config = load_config(base)
    probe = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    trained = load_model(base, quantize="nf4")  # the model QLoRA trained: 4-bit base + unmerged adapter
    load_adapter(trained, qlora_adapter)
    with torch.no_grad():
        trained_logits = trained(probe)

    gap, note = merge_note(capsys, ["--model", str(base), "--adapter", str(qlora_adapter),
                                    "--output", str(tmp_path / "16bit")])
    assert "--base nf4" in note and "trained on a 4-bit (NF4) base" in note
    measured = (hf_logits(tmp_path / "16bit", probe) - trained_logits).abs().max().item()  # transformers reads it
    assert gap == pytest.approx(measured, rel=1e-3, abs=1e-5) and gap > 1e-3

    gap_nf4, _ = merge_note(capsys, ["--model", str(base), "--adapter", str(qlora_adapter),
                                     "--output", str(tmp_path / "nf4"), "--base", "nf4"])
    assert gap_nf4 < 1e-4  # float32 rounding only: exactly the model that was trained
    assert (hf_logits(tmp_path / "nf4", probe) - trained_logits).abs().max() < 1e-4
    assert "quantization_config" not in json.loads((tmp_path / "nf4" / "config.json").read_text())


def test_a_lora_adapter_merges_without_a_note(tmp_path, checkpoints, adapters, capsys):
    assert run_cli(main, ["--model", str(checkpoints["llama"]), "--adapter", str(adapters["llama"][0]),
                          "--output", str(tmp_path)]) == 0
    assert "note:" not in capsys.readouterr().out
