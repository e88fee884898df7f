"""GGUF models (formats/gguf_read.py) against two oracles: transformers' own GGUF loader on the same file, and
transformers on the Hugging Face checkpoint the file was converted from (tests/gguf_models.py converts as
llama.cpp does).

Where transformers' GGUF loader takes config-class defaults instead of what llama.cpp hard-codes or writes, the
file is compared with the original checkpoint only (test_logits_equal_original_checkpoint): Gemma 1 (not read by
transformers' GGUF loader at all), Gemma 2's soft-caps and attention scale, Gemma 3's RoPE scaling, Phi-3's partial
rotary / sliding window / LongRoPE, Llama's linear and Llama 3.1 RoPE and biases, Qwen2's YaRN. In the oracle
comparison those families use the values transformers assumes (e.g. head_dim 128 for Qwen3, 256 for Gemma 2/3).
"""

import pytest
import torch

pytest.importorskip("gguf")

from gguf_models import K_QUANTS, QUANTIZABLE, hf_to_gguf  # noqa: E402
from tiny_models import load_hf_model, make_tiny_checkpoint  # noqa: E402

from minilora.errors import MiniloraError  # noqa: E402
from minilora.formats import find_gguf, load_model, read_gguf  # noqa: E402
from minilora.generation import generate  # noqa: E402  (not minilora.generate: once the `python -m minilora.generate` module is imported, that name is the module)

TOL = 1e-4  # float32 logits; measured differences are 0 - 5e-6 (summation order)


def _ids(T, vocab=256, seed=0):
    return torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


def _oracle(gguf_path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype,
                                                attn_implementation="eager").eval()


# family -> config overrides that transformers' GGUF loader can represent (see the module docstring)
ORACLE_FAMILIES = {
    "llama": ("llama", {}),
    "mistral_style": ("mistral", dict(sliding_window=None, head_dim=32, rope_parameters={
        "rope_type": "default", "rope_theta": 1_000_000.0})),  # llama.cpp writes Mistral as llama
    "qwen2": ("qwen2", dict(use_sliding_window=False)),
    "qwen3": ("qwen3", dict(head_dim=128)),
    "gemma2": ("gemma2", dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0)),
    "gemma3": ("gemma3_text", dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=2, layer_types=None,
                                   rope_parameters=None)),
    "phi3": ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})),
}


@pytest.mark.parametrize("case", sorted(ORACLE_FAMILIES))
def test_logits_equal_transformers_gguf_loader(case, tmp_path):
    family, overrides = ORACLE_FAMILIES[case]
    hf_dir = make_tiny_checkpoint(family, tmp_path / "hf", **overrides)
    path = hf_to_gguf(hf_dir, tmp_path / "gguf" / "model.gguf", name="Mistral-7B" if "mistral" in case else "tiny")
    ids = _ids(8)
    model = load_model(path)
    with torch.no_grad():
        ours = model(ids)
        assert (ours - _oracle(path)(ids).logits).abs().max().item() <= TOL
        assert (ours - load_hf_model(hf_dir)(ids).logits).abs().max().item() <= TOL


# families whose GGUF files carry what transformers' GGUF loader ignores; compared with the original checkpoint
ORIGINAL_FAMILIES = {
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16)),  # llama.cpp: 1/sqrt(head_dim) unless 27B
    "gemma3_6_layers": ("gemma3_text", dict(num_hidden_layers=6, layer_types=None)),  # 5 local : 1 global, scaled
    "phi3_partial_window": ("phi3", {}),  # partial rotary 0.5, sliding window 8
    "phi3_longrope": ("phi3_longrope", dict(sliding_window=None)),
    "llama3_rope": ("llama3", {}),  # rope_freqs tensor
    "llama_linear_bias": ("llama_linear", {}),  # linear RoPE scaling, attention and MLP biases
    "qwen2_yarn": ("qwen2_yarn", {}),
}


@pytest.mark.parametrize("case", sorted(ORIGINAL_FAMILIES))
def test_logits_equal_original_checkpoint(case, tmp_path):
    family, overrides = ORIGINAL_FAMILIES[case]
    hf_dir = make_tiny_checkpoint(family, tmp_path / "hf", **overrides)
    path = hf_to_gguf(hf_dir, tmp_path / "model.gguf")
    ids = _ids(24)  # crosses the sliding windows (8) and the longrope / llama3 original contexts (16)
    with torch.no_grad():
        ours = load_model(path)(ids)
        assert (ours - load_hf_model(hf_dir)(ids).logits).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A llama whose every matrix row is a multiple of 256 wide, so every block type fits."""
    path = tmp_path_factory.mktemp("wide") / "hf"
    return make_tiny_checkpoint("llama", path, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                head_dim=64)


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS)
def test_each_tensor_type_equals_transformers_gguf_loader(qtype, wide_llama, tmp_path):
    path = hf_to_gguf(wide_llama, tmp_path / "model.gguf", qtype=qtype)
    ids = _ids(8)
    with torch.no_grad():
        ours = load_model(path)(ids)
        ref = _oracle(path)(ids).logits
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= TOL * max(1.0, scale)
    if qtype in QUANTIZABLE:  # a quantized copy of the real weights: close to the float model, by the type's error
        with torch.no_grad():
            exact = load_hf_model(wide_llama)(ids).logits
        bound = {"F32": 1e-5, "F16": 1e-2, "BF16": 5e-2, "Q8_0": 5e-2}.get(qtype, 1.0)
        assert (ours - exact).abs().max().item() <= bound * max(1.0, scale)


def test_dtype_and_config(wide_llama, tmp_path):
    path = hf_to_gguf(wide_llama, tmp_path / "model.gguf", qtype="Q8_0")
    f32, bf16 = load_model(path), load_model(path, dtype="bfloat16")
    for (name, a), (_, b) in zip(f32.state_dict().items(), bf16.state_dict().items()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name
    config, tensors = read_gguf(path)
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim) == (256, 2, 64)
    assert config.tie_word_embeddings is False and config.hf_config["model_type"] == "llama"
    names = [n for n, _ in tensors]
    assert sorted(names) == sorted(f32.state_dict())


def test_greedy_tokens_equal_transformers(tmp_path):
    hf_dir = make_tiny_checkpoint("qwen3", tmp_path / "hf", head_dim=128)
    path = hf_to_gguf(hf_dir, tmp_path / "g" / "model.gguf")
    prompt = _ids(5, seed=3)
    ours = generate(load_model(path), prompt, max_new_tokens=12, eos_token_ids=[])
    ref = _oracle(path).generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert ours.tolist() == ref.tolist()


def test_nf4_load_equals_quantizing_the_float_model(wide_llama, tmp_path):
    from minilora.formats import quantize_model
    from minilora.quant import NF4Linear

    path = hf_to_gguf(wide_llama, tmp_path / "model.gguf", qtype="Q4_K")
    direct = load_model(path, quantize="nf4")
    after = quantize_model(load_model(path))
    assert isinstance(direct.model.layers[0].mlp.up_proj, NF4Linear)
    ids = _ids(6)
    with torch.no_grad():
        assert torch.equal(direct(ids), after(ids))


def test_folder_holding_one_gguf(tmp_path):
    hf_dir = make_tiny_checkpoint("llama", tmp_path / "hf")
    path = hf_to_gguf(hf_dir, tmp_path / "only" / "weights.gguf")
    assert find_gguf(path.parent) == path and find_gguf(hf_dir) is None
    ids = _ids(4)
    with torch.no_grad():
        assert torch.equal(load_model(path.parent)(ids), load_model(path)(ids))
    hf_to_gguf(hf_dir, tmp_path / "only" / "second.gguf")
    with pytest.raises(MiniloraError, match="2 GGUF files"):
        load_model(path.parent)
    with pytest.raises(MiniloraError, match="GGUF file not found"):
        load_model(tmp_path / "missing.gguf")


def test_train_and_generate_commands_take_a_gguf(tmp_path, capsys):
    """--model accepts a .gguf (train, QLoRA) and a folder holding one (generate with the trained adapter)."""
    from minilora.errors import run_cli
    from minilora.generate import main as generate_main
    from minilora.train import main as train_main

    hf_dir = make_tiny_checkpoint("llama", tmp_path / "hf", tokenizer="llama3")
    path = hf_to_gguf(hf_dir, tmp_path / "gguf" / "model.gguf", qtype="Q8_0", tokenizer=hf_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The tea garden number {i} is green, and the sea is calm." for i in range(40)))
    out = tmp_path / "run"
    assert run_cli(train_main, ["--model", str(path), "--data", str(corpus), "--mode", "base", "--method", "qlora",
                                "--max-steps", "2", "--block-size", "16", "--batch-size", "2",
                                "--output", str(out)]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert run_cli(generate_main, ["--model", str(path.parent), "--adapter", str(out / "adapter"), "--prompt",
                                   "The tea", "--max-new-tokens", "4"]) == 0
    assert "The tea" in capsys.readouterr().out
