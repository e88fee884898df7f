"""config.json (both dialects) -> ModelConfig, and the errors for what minilora does not support.

The transformers-5 configs come from `save_pretrained` (tiny_models.py); their transformers-4 twins are written by
hand here (`to_transformers4`), and both must give the same ModelConfig — and, end to end, the same logits as
transformers reading the same file.
"""

import copy
import json

import pytest
import torch

from minilora.checkpoint import load_model
from minilora.config import ModelConfig, RopeConfig, load_config
from minilora.errors import MiniloraError
from tiny_models import FAMILIES, load_hf_model, make_tiny_checkpoint

S, F = "sliding_attention", "full_attention"


def to_transformers4(d: dict) -> dict:
    """Rewrite a transformers-5 config.json dict in the transformers-4 dialect, as older hub checkpoints have it."""
    d = copy.deepcopy(d)
    d["torch_dtype"] = d.pop("dtype", "float32")
    params = d.pop("rope_parameters")
    if d["model_type"] == "gemma3_text":
        full, local = params[F], params[S]
        d["rope_theta"], d["rope_local_base_freq"] = full["rope_theta"], local["rope_theta"]
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        d["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
        layer_types = d.pop("layer_types")
        d.pop("_sliding_window_pattern", None)
        pattern = layer_types.index(F) + 1  # global layer every `pattern` layers
        assert layer_types == [S if (i + 1) % pattern else F for i in range(len(layer_types))]
        d["sliding_window_pattern"] = pattern
        return d
    d["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:  # Phi-3 kept it at the top level
        d["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    rope_type = params.pop("rope_type", "default")
    d["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **params}  # oldest spelling: "type"
    if d["model_type"] in ("gemma2", "qwen2", "qwen3"):
        d.pop("layer_types", None)  # implied by the defaults (alternation / max_window_layers)
    return d


@pytest.fixture(scope="module")
def saved_configs(tmp_path_factory):
    return {f: json.loads((make_tiny_checkpoint(f, tmp_path_factory.mktemp(f)) / "config.json").read_text())
            for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_both_dialects_give_the_same_config(saved_configs, family):
    v5 = saved_configs[family]
    v4 = to_transformers4(v5)
    assert "rope_parameters" in v5 and "rope_parameters" not in v4 and "torch_dtype" in v4
    assert ModelConfig.from_hf_dict(v4) == ModelConfig.from_hf_dict(v5)


@pytest.mark.parametrize("family", ["llama3", "gemma3_text", "phi3"])
def test_transformers4_dialect_runs_like_transformers(tmp_path, family):
    """End to end: a hand-written transformers-4 config.json, read by minilora and by transformers, same logits."""
    path = make_tiny_checkpoint(family, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(to_transformers4(config)))
    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (load_model(path)(ids) - load_hf_model(path)(ids).logits).abs().max()
    assert diff < 1e-4


def test_family_features():
    cfg = {f: ModelConfig.from_hf_dict(d) for f, d in _minimal_configs().items()}
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].o_bias and set(cfg["qwen2"].layer_types) == {F}
    assert cfg["qwen3"].qk_norm and not cfg["qwen3"].qkv_bias and cfg["qwen3"].head_dim == 128  # Qwen3 default
    assert cfg["gemma"].norm_plus_one and cfg["gemma"].scale_embeddings and cfg["gemma"].tie_word_embeddings
    assert cfg["gemma"].hidden_act == "gelu_tanh"  # "gelu" in Gemma configs means the tanh approximation
    assert cfg["gemma2"].layer_types == (S, F, S, F) and cfg["gemma2"].sandwich_norm
    assert (cfg["gemma2"].attn_logit_softcap, cfg["gemma2"].final_logit_softcap) == (50.0, 30.0)  # defaults
    assert cfg["gemma2"].attn_scale == 256**-0.5  # query_pre_attn_scalar default, not head_dim
    assert cfg["phi3"].fused_qkv and cfg["phi3"].fused_gate_up and cfg["phi3"].rms_norm_eps == 1e-5
    assert cfg["mistral"].layer_types == (S,) * 4 and cfg["mistral"].sliding_window == 4096
    assert cfg["llama"].attn_scale == 16**-0.5 and not cfg["llama"].tie_word_embeddings


def test_llama31_style_config():
    """Llama 3.1's published rope_scaling block (transformers-4 dialect)."""
    d = _minimal_configs()["llama"] | {
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope[F] == RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert cfg.dtype == "bfloat16"


def test_gemma3_layer_pattern_and_rope_bases_in_both_dialects():
    base = _minimal_configs()["gemma3_text"] | {"num_hidden_layers": 12, "sliding_window": 512}
    v4 = base | {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6,
                 "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    v5 = base | {"layer_types": ([S] * 5 + [F]) * 2, "rope_parameters": {
        F: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        S: {"rope_type": "default", "rope_theta": 10_000.0}}}
    for d in (v4, v5):
        cfg = ModelConfig.from_hf_dict(d)
        assert cfg.layer_types == (S, S, S, S, S, F) * 2
        assert cfg.rope[F] == RopeConfig(theta=1e6, rope_type="linear", factor=8.0)  # scaling: global layers only
        assert cfg.rope[S] == RopeConfig(theta=1e4)
        assert cfg.qk_norm and cfg.sandwich_norm and cfg.final_logit_softcap is None


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gpt2"}, ["'gpt2'", "llama", "gemma3_text", "phi3"]),
    ({"model_type": "gemma3"}, ["gemma3_text"]),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, ["'yarn'", "llama3", "linear"]),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, ["'dynamic'"]),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, ["num_key_value_heads"]),
    ({"hidden_act": "relu"}, ["'relu'"]),
    ({"torch_dtype": "float8_e4m3fn"}, ["float8_e4m3fn", "bfloat16"]),
    ({"use_bidirectional_attention": True}, ["use_bidirectional_attention"]),
])
def test_unsupported_configs_are_clear_errors(change, words):
    d = _minimal_configs()["llama"] | change
    with pytest.raises(MiniloraError) as e:
        ModelConfig.from_hf_dict(d)
    for word in words:
        assert word in str(e.value)


def test_phi3_longrope_is_refused():
    d = _minimal_configs()["phi3"] | {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                                       "long_factor": [2.0] * 8}}
    with pytest.raises(MiniloraError, match="'longrope' is not supported"):
        ModelConfig.from_hf_dict(d)


def test_missing_field_is_named():
    d = _minimal_configs()["llama"]
    del d["intermediate_size"]
    with pytest.raises(MiniloraError, match="'intermediate_size' is missing"):
        ModelConfig.from_hf_dict(d)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(MiniloraError, match="model folder not found"):
        load_config(tmp_path / "nope")
    with pytest.raises(MiniloraError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MiniloraError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_minimal_configs()["llama"] | {"model_type": "bert"}))
    with pytest.raises(MiniloraError, match=f"{tmp_path}/config.json: model_type 'bert'"):
        load_config(tmp_path)


def _minimal_configs() -> dict[str, dict]:
    """The fields each family's config.json must have; the rest take the family's transformers defaults."""
    core = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2)
    families = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
    configs = {f: dict(core, model_type=f) for f in families}
    configs["gemma"]["hidden_act"] = "gelu"
    return configs
