"""4-bit checkpoints in the transformers + bitsandbytes format: read without re-quantizing, written back identically.

The oracle checkpoints are made here by transformers itself: a tiny fp32 model loaded with
BitsAndBytesConfig(load_in_4bit=True, nf4, double quant) on the CPU and written with save_pretrained.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora.formats.safetensors_folder as checkpoint
from minilora.formats.safetensors_folder import load_model, save_model
from minilora.errors import MiniloraError
from minilora.quant.nf4_linear import NF4Linear
from minilora.quant.bnb_checkpoint import dequantize_model
from tiny_models import _quiet, load_hf_model, make_tiny_checkpoint

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
FAMILIES = ["llama", "qwen2"]  # qwen2: biases on q/k/v, which stay in the compute dtype beside the 4-bit weight
# Logits of the same 4-bit weights through minilora and through transformers + bnb, both in float32: the weights
# are bit-identical, only the order of float32 operations differs (as for the unquantized models, where
# test_checkpoint allows 1e-4). Measured: 4.1e-6 on logits up to 6.2.
LOGIT_ATOL = 1e-4


def bnb_config(dtype=torch.float32):
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def hf_4bit(path, **kwargs):
    """transformers + bitsandbytes on the CPU, eager attention (the reference math), bnb's exact fp32 path.

    On a CPU with AVX512-BF16, bnb's Linear4bit repacks its weight on the first eval-mode no-grad forward for a
    bf16 kernel (absmax rounded to bf16, bf16 products): a lossier path (logits move by ~0.2 on these models) that
    is not the format or the math under test, so it is switched off.
    """
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    _quiet()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                                 attn_implementation="eager", **kwargs).eval()
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per family: the fp32 checkpoint, and the 4-bit checkpoint transformers + bnb saved from it."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for family in FAMILIES:
        dense = make_tiny_checkpoint(family, root / family)
        hf_4bit(dense, quantization_config=bnb_config()).save_pretrained(root / f"{family}-nf4")
        out[family] = dense, root / f"{family}-nf4"
    return out


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_a_transformers_4bit_checkpoint_as_stored(folders, family, monkeypatch):
    dense, nf4 = folders[family]
    monkeypatch.setattr(checkpoint, "quantize_nf4", None)  # calling it would fail: nothing is re-quantized
    model = load_model(nf4)  # quantize=None: a 4-bit checkpoint loads as 4-bit anyway
    monkeypatch.undo()
    stored = load_file(nf4 / "model.safetensors")
    ours = model.state_dict()
    assert ours.keys() == stored.keys()
    for key, t in stored.items():
        assert torch.equal(ours[key], t), key
    assert all(isinstance(model.get_submodule(k.removesuffix(".weight.absmax")), NF4Linear)
               for k in stored if k.endswith(".weight.absmax"))
    expected = logits(hf_4bit(nf4))
    assert (logits(model) - expected).abs().max() < LOGIT_ATOL
    # and it is the model we get by quantizing the original checkpoint ourselves, exactly
    assert torch.equal(logits(model), logits(load_model(dense, quantize="nf4")))


def test_dtype_sets_the_compute_dtype_of_a_4bit_checkpoint(folders):
    model = load_model(folders["llama"][1], dtype="bfloat16")
    assert {m.compute_dtype for m in model.modules() if isinstance(m, NF4Linear)} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert logits(model).dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_save_model_writes_what_transformers_writes(folders, family, tmp_path):
    dense, theirs = folders[family]
    model = load_model(dense, quantize="nf4")
    save_model(model, tmp_path)
    ours, stored = load_file(tmp_path / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert ours.keys() == stored.keys()
    for key in stored:  # the packed codes, absmax codes, scales, code tables and quant-state JSON bytes
        assert torch.equal(ours[key], stored[key]), key
    config, reference = (json.loads((d / "config.json").read_text()) for d in (tmp_path, theirs))
    assert config["quantization_config"] == reference["quantization_config"]
    assert config["dtype"] == reference["dtype"] == "float32"
    # transformers + bnb load what we wrote, and so do we
    assert (logits(hf_4bit(tmp_path)) - logits(model)).abs().max() < LOGIT_ATOL
    assert torch.equal(logits(load_model(tmp_path)), logits(model))


def test_sharded_4bit_save_loads_everywhere(folders, tmp_path):
    model = load_model(folders["llama"][0], quantize="nf4")
    save_model(model, tmp_path, shard_size=3_000)  # small shards: a layer's six tensors land in different files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 10
    assert torch.equal(logits(load_model(tmp_path)), logits(model))
    assert (logits(hf_4bit(tmp_path)) - logits(model)).abs().max() < LOGIT_ATOL


def test_dequantize_model_then_save_gives_a_plain_checkpoint(folders, tmp_path):
    model = load_model(folders["qwen2"][1])
    expected = logits(model)
    dequantize_model(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    assert torch.equal(logits(model), expected)  # the same dequantized weights, now dense
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (logits(load_hf_model(tmp_path)) - expected).abs().max() < LOGIT_ATOL


# --- what is refused -----------------------------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_quantization_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    (dict(bnb_4bit_quant_type="fp4"), "bnb_4bit_quant_type is 'fp4'; only 'nf4'"),
    (dict(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True, _load_in_8bit=True), "8-bit"),
    (dict(quant_method="gptq"), "'gptq' quantization_config"),
    (dict(bnb_4bit_quant_storage="bfloat16"), "bnb_4bit_quant_storage 'bfloat16'"),
])
def test_other_quantizations_are_refused(folders, tmp_path, changes, message):
    folder = _copy(folders["llama"][1], tmp_path / "m")
    _edit_quantization_config(folder, **changes)
    with pytest.raises(MiniloraError, match=message):
        load_model(folder)


@pytest.mark.parametrize("kind, message", [("fp4", "'fp4'; only 'nf4'"), ("int8", "8-bit")])
def test_real_fp4_and_8bit_checkpoints_are_refused(folders, tmp_path, kind, message):
    import transformers

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4") if kind == "fp4" \
        else transformers.BitsAndBytesConfig(load_in_8bit=True)
    hf_4bit(folders["llama"][0], quantization_config=config).save_pretrained(tmp_path)  # written by transformers
    with pytest.raises(MiniloraError, match=message):
        load_model(tmp_path)


def _rewrite(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop(f"{Q}.nested_absmax"), f"{Q}.nested_absmax"),
    (lambda t: t.pop(f"{Q}.absmax"), f"missing tensor '{Q}.absmax'"),
    (lambda t: t.update({Q: t[Q][:-1]}), "weight has 2047 values, expected 2048"),
    (lambda t: t.update({Q: torch.zeros(64, 64)}), f"{Q} is not 4-bit"),  # a block linear left in 16/32 bits
    (lambda t: t.update({"model.embed_tokens.weight.absmax": torch.zeros(4, dtype=torch.uint8)}),
     "unexpected tensor 'model.embed_tokens.weight.absmax'"),
])
def test_corrupt_4bit_checkpoints_name_the_tensor(folders, tmp_path, edit, message):
    folder = _copy(folders["llama"][1], tmp_path / "m")
    _rewrite(folder, edit)
    with pytest.raises(MiniloraError, match=message):
        load_model(folder)


def test_shape_disagreeing_with_config_is_refused(folders, tmp_path):
    folder = _copy(folders["llama"][1], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MiniloraError, match=r"4-bit tensor 'model.layers.0.mlp.gate_proj.weight' has shape"):
        load_model(folder)
