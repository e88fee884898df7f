"""Loading and saving model folders: dtypes, shards, meta-device build, round trips through transformers, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minilora.formats.safetensors_folder import load_model, save_model
from minilora.errors import MiniloraError
from tiny_models import load_hf_model, make_tiny_checkpoint

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"))


def test_dtype_defaults_to_the_config_and_can_be_chosen(tmp_path):
    path = make_tiny_checkpoint("qwen2", tmp_path, dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in load_model(path).parameters()} == {torch.bfloat16}
    for dtype in ("float32", torch.float16):
        model = load_model(path, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {getattr(torch, str(dtype).removeprefix("torch."))}
    with pytest.raises(MiniloraError, match="dtype must be one of"):
        load_model(path, dtype="int8")


def test_no_config_dtype_means_float32(llama, tmp_path):
    config = json.loads((llama / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes())
    assert {p.dtype for p in load_model(folder).parameters()} == {torch.float32}


def test_the_model_is_built_on_meta_without_random_init(llama, monkeypatch):
    """No weight is ever allocated for real before loading: every nn.Linear/Embedding init runs on meta tensors."""
    devices = []
    for cls in (torch.nn.Linear, torch.nn.Embedding):
        original = cls.reset_parameters

        def spy(self, original=original):
            devices.append(self.weight.device.type)
            original(self)

        monkeypatch.setattr(cls, "reset_parameters", spy)
    model = load_model(llama)
    assert devices and set(devices) == {"meta"}
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    # the loaded tensors are the file's values
    file = load_file(llama / "model.safetensors")
    assert all(torch.equal(t, file[name]) for name, t in model.state_dict().items())
    assert not model.training


def test_sharded_checkpoint_written_by_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    single = make_tiny_checkpoint("gemma2", tmp_path / "single")
    hf = AutoModelForCausalLM.from_pretrained(single)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(logits(load_model(tmp_path / "sharded")), logits(load_model(single)))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3"])  # untied, tied, layer types, fused
def test_save_model_reloads_in_transformers_and_minilora(tmp_path, family):
    path = make_tiny_checkpoint(family, tmp_path / "in")
    model = load_model(path)
    save_model(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved == json.loads((path / "config.json").read_text())  # written back faithfully
    expected = logits(model)
    assert torch.equal(logits(load_model(tmp_path / "out")), expected)
    assert (logits(load_hf_model(tmp_path / "out")) - expected).abs().max() < 1e-4


def test_save_model_shards_and_replaces_an_earlier_save(llama, tmp_path):
    model = load_model(llama)
    out = tmp_path / "out"
    save_model(model, out, shard_size=30_000)  # ~30 KB per shard: the tiny llama's 150 KB -> several shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert torch.equal(logits(load_model(out)), logits(model))
    assert (logits(load_hf_model(out)) - logits(model)).abs().max() < 1e-4

    save_model(model.to(torch.bfloat16), out)  # one file now: the old shards and index must go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(out).model.norm.weight.dtype == torch.bfloat16


def test_save_model_refuses_unmerged_lora(llama, tmp_path):
    model = load_model(llama)
    model.model.layers[0].self_attn.q_proj.lora_A = torch.nn.Linear(64, 2, bias=False)  # what a LoRA wrapper adds
    with pytest.raises(MiniloraError, match="merge"):
        save_model(model, tmp_path)


def test_tied_checkpoint_with_a_redundant_lm_head_loads(tmp_path):
    """Some tied checkpoints also store lm_head.weight (a copy of the embeddings): tolerated, not used."""
    path = make_tiny_checkpoint("gemma", tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # saved by old transformers versions
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert (logits(load_model(path)) - logits(load_hf_model(path))).abs().max() < 1e-4


def test_quantize_choices(llama):
    """quantize="nf4" itself is tested in test_qlora.py and test_quantized_checkpoint.py."""
    with pytest.raises(MiniloraError, match="one of nf4"):
        load_model(llama, quantize="int3")


# ---------------------------------------------------------------------------------------------------------
# errors: each names what is wrong and where
# ---------------------------------------------------------------------------------------------------------
def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_folder_and_files(llama, tmp_path):
    with pytest.raises(MiniloraError, match="model folder not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(MiniloraError, match="no config.json"):
        load_model(tmp_path)
    folder = _copy(llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(MiniloraError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(folder)


def test_corrupt_safetensors(llama, tmp_path):
    folder = _copy(llama, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(MiniloraError, match=r"cannot read .*model.safetensors: not a valid safetensors file"):
        load_model(folder)
    data = (llama / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(MiniloraError, match="model.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"tensor 'model.layers.1.mlp.up_proj.weight' is missing from model.safetensors"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}),
     r"unexpected tensor 'model.layers.0.mlp.extra.weight' in .*model.safetensors"),
    (lambda t: t.update({"model.norm.weight": torch.ones(65)}),
     r"tensor 'model.norm.weight' in .*model.safetensors has shape \(65,\), config.json implies \(64,\)"),
])
def test_tensor_mismatches_name_tensor_and_file(llama, tmp_path, edit, message):
    folder = _copy(llama, tmp_path / "m")
    _rewrite_tensors(folder, edit)
    with pytest.raises(MiniloraError, match=message):
        load_model(folder)


def test_index_naming_a_missing_shard(llama, tmp_path):
    model = load_model(llama)
    save_model(model, tmp_path / "out", shard_size=30_000)
    second = sorted((tmp_path / "out").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(MiniloraError, match=f"lists {second.name}, which is not in"):
        load_model(tmp_path / "out")


def test_pytorch_bin_only_folder_gets_a_hint(llama, tmp_path):
    folder = _copy(llama, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(MiniloraError, match="convert it to safetensors"):
        load_model(folder)


def test_integer_dtype_of_the_right_byte_size_is_named(llama, tmp_path):
    """I32 where F32 belongs has the same byte size, so the file reads; its int32 weights used to be installed
    and fail at the first matmul (or compute garbage after a silent cast)."""
    folder = _copy(llama, tmp_path / "m")
    _rewrite_tensors(folder, lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"].view(torch.int32)}))
    with pytest.raises(MiniloraError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight' in .*model.safetensors "
                                            r"has dtype I32, but every weight of this model is floating point"):
        load_model(folder)
