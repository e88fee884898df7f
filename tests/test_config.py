"""config.json (both dialects) -> ModelConfig, and the errors for what minilora does not support.

The transformers-5 configs come from `save_pretrained` (tiny_models.py); their transformers-4 twins are written by
hand here (`to_transformers4`), and both must give the same ModelConfig — and, end to end, the same logits as
transformers reading the same file.
"""

import copy
import json
import math

import pytest
import torch

from minilora.formats.safetensors_folder import load_model
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


@pytest.mark.parametrize("family", ["llama3", "gemma3_text", "phi3", "phi3_longrope", "qwen2_yarn"])
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
    ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, ["'dynamic'", "llama3", "yarn", "longrope"]),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, ["'dynamic'"]),
    ({"rope_scaling": {"type": "ntk", "factor": 2.0}}, ["'ntk'"]),
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


def _minimal_configs() -> dict[str, dict]:
    """The fields each family's config.json must have; the rest take the family's transformers defaults."""
    core = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2)
    families = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
    configs = {f: dict(core, model_type=f) for f in families}
    configs["gemma"]["hidden_act"] = "gelu"
    return configs


def _phi3_128k(rope_type="longrope"):
    """Phi-3-mini-128k-instruct's rope fields (transformers-4 dialect), on a model with 8 rotating pairs."""
    scaling = {"type": rope_type, "short_factor": [1.0 + 0.01 * i for i in range(8)],
               "long_factor": [1.0 + 2.0 * i for i in range(8)]}
    return _minimal_configs()["phi3"] | {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                                         "rope_theta": 10000.0, "rope_scaling": scaling}


@pytest.mark.parametrize("rope_type", ["longrope", "su", "yarn"])  # "su" and Phi-3's "yarn": older names
def test_phi3_128k_style_longrope(rope_type):
    r = ModelConfig.from_hf_dict(_phi3_128k(rope_type)).rope[F]
    assert r.rope_type == "longrope" and r.original_max_position_embeddings == 4096
    assert r.factor == 32.0  # 131072 / 4096
    assert r.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))  # 1.19
    assert r.short_factor[1] == 1.01 and r.long_factor[1] == 3.0


def test_yarn_config_in_both_dialects():
    """Qwen2.5's YaRN block (transformers 4, "type") and Qwen3's (transformers 5, "rope_type") read alike."""
    qwen = _minimal_configs()["qwen2"] | {"max_position_embeddings": 32768, "rope_theta": 1e6}
    v4 = qwen | {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    v5 = qwen | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                                     "rope_theta": 1e6}}
    for d in (v4, v5):
        r = ModelConfig.from_hf_dict(d).rope[F]
        assert r == RopeConfig(theta=1e6, rope_type="yarn", factor=4.0, original_max_position_embeddings=32768,
                               attention_factor=0.1 * math.log(4.0) + 1)


# Config shapes found on the hub (synthetic factor lists of the right length), read by transformers and by minilora.
# Phi-3's "su" spelling is left out: transformers 5 refuses it unless rope_scaling repeats the original context.
HUB_STYLE_ROPE = {
    "phi3_mini_128k": _phi3_128k("longrope"),
    "phi3_older_yarn_name": _phi3_128k("yarn"),
    "phi4_mini_partial_rotary": _minimal_configs()["phi3"] | {
        "hidden_size": 128, "num_attention_heads": 1, "num_key_value_heads": 1, "partial_rotary_factor": 0.75,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0 + i for i in range(48)]},
    },
    "phi3_explicit_factor_and_attention_factor": _phi3_128k() | {"rope_scaling": {
        "type": "longrope", "short_factor": [1.5] * 8, "long_factor": [3.0] * 8, "factor": 8.0,
        "attention_factor": 1.25,
    }},
    "qwen3_yarn": _minimal_configs()["qwen3"] | {
        "max_position_embeddings": 131072, "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    },
    "llama_yarn_top_level_original_wins": _minimal_configs()["llama"] | {
        "original_max_position_embeddings": 2048,
        "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024, "beta_fast": 16,
                         "beta_slow": 2, "truncate": False, "mscale": 0.9, "mscale_all_dim": 0.5},
    },
    "mistral_yarn_original_from_max_position": _minimal_configs()["mistral"] | {
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "attention_factor": 1.1},
    },
}


@pytest.mark.parametrize("name", HUB_STYLE_ROPE)
def test_rope_settings_match_transformers(name):
    """What transformers makes of the same config.json dict (which key wins, each default): the resolved original
    context and attention factor, and cos/sin at the longest length that still fits it and (longrope) one past it."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from minilora.model import layer_rope

    cfg = ModelConfig.from_hf_dict(copy.deepcopy(HUB_STYLE_ROPE[name]))
    r = cfg.rope[F]
    hf = AutoConfig.for_model(**copy.deepcopy(HUB_STYLE_ROPE[name]))
    hf_rope = LlamaRotaryEmbedding(hf)  # the same module in every family: ROPE_INIT_FUNCTIONS + longrope's switch
    assert hf_rope.rope_type == r.rope_type
    assert r.original_max_position_embeddings == hf.rope_parameters["original_max_position_embeddings"]
    assert r.attention_factor == pytest.approx(hf_rope.attention_scaling, rel=1e-12)
    for length in (r.original_max_position_embeddings, r.original_max_position_embeddings + 1):
        positions = torch.tensor([[0, 1, 7, 100, length - 1]])  # the call reaches `length` tokens
        cos, sin = layer_rope(r, cfg.rotary_dim, positions, torch.float32)
        hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions)
        assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


@pytest.mark.parametrize("change, message", [
    ({"long_factor": [1.0] * 7}, "long_factor has 7 numbers, expected one per rotating dim pair: 8"),
    ({"short_factor": [1.0] * 16}, "short_factor has 16 numbers"),
    ({"short_factor": None}, "longrope short_factor must be a list of numbers, got None"),
    ({"long_factor": [1.0] * 7 + ["2.0"]}, "longrope long_factor must be a list of numbers"),
    ({"long_factor": [1.0] * 7 + [0.0]}, "long_factor must be a list of positive numbers"),
    ({"factor": "32"}, "rope factor must be a number"),
    ({"attention_factor": -1.0}, "rope attention_factor must be positive"),
])
def test_malformed_longrope_fields_are_named(change, message):
    d = _phi3_128k()
    d["rope_scaling"] |= change
    with pytest.raises(MiniloraError, match=message):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("change, message", [
    ({"factor": None}, "'yarn' needs a 'factor'"),
    ({"beta_fast": "32"}, "rope beta_fast must be a number"),
    ({"beta_slow": -1.0}, "rope beta_slow must be positive"),
    ({"mscale": [1.0]}, "rope mscale must be a number"),
    ({"attention_factor": 0.0}, "rope attention_factor must be positive"),
    ({"original_max_position_embeddings": -4096}, "rope original_max_position_embeddings must be positive"),
])
def test_malformed_yarn_fields_are_named(change, message):
    d = _minimal_configs()["qwen2"] | {"rope_scaling": {"type": "yarn", "factor": 4.0} | change}
    with pytest.raises(MiniloraError, match=message):
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


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "128"}, "hidden_size must be an integer, got '128' (str)"),
    ({"num_attention_heads": 0}, "num_attention_heads must be at least 1, got 0"),  # was a ZeroDivisionError
    ({"rope_theta": "abc"}, "rope_theta must be a number, got 'abc'"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a number, got 'tiny'"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be at least 0, got -1e-06"),  # NaN from the first step otherwise
    ({"max_position_embeddings": "512"}, "max_position_embeddings must be an integer, got '512'"),
    ({"intermediate_size": True}, "intermediate_size must be an integer, got True (bool)"),  # bool is an int
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false, got 'no'"),  # was taken as true
    ({"hidden_size": 64.0}, "hidden_size must be an integer, got 64.0"),
    ({"eos_token_id": [2, "3"]}, "eos_token_id must be an integer id or a list of them"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be positive"),
])
def test_wrong_field_types_are_named(change, message):
    d = _minimal_configs()["llama"] | change
    with pytest.raises(MiniloraError) as e:
        ModelConfig.from_hf_dict(d)
    assert message in str(e.value) and "config.json" in str(e.value)


def test_negative_max_position_embeddings_is_named_as_itself():
    """It used to be reported as the rope field original_max_position_embeddings it defaults."""
    with pytest.raises(MiniloraError) as e:
        ModelConfig.from_hf_dict(_minimal_configs()["llama"] | {"max_position_embeddings": -1})
    assert str(e.value).startswith("config.json: max_position_embeddings must be at least 1, got -1")
    assert "rope" not in str(e.value)


def test_wrong_type_inside_rope_parameters_is_named():
    d = _minimal_configs()["llama"] | {"rope_parameters": {"rope_type": "default", "rope_theta": "abc"}}
    with pytest.raises(MiniloraError, match="rope rope_theta must be a number, got 'abc'"):
        ModelConfig.from_hf_dict(d)


def test_valid_booleans_and_nulls_still_load():
    cfg = ModelConfig.from_hf_dict(_minimal_configs()["llama"] | {
        "tie_word_embeddings": True, "sliding_window": None, "head_dim": None, "rms_norm_eps": 0})
    assert cfg.tie_word_embeddings is True and cfg.head_dim == 16 and cfg.rms_norm_eps == 0


def test_wrong_field_type_in_a_model_folder_is_a_cli_error(tmp_path):
    """End to end: the generate command prints one line naming the folder and field (no traceback)."""
    import subprocess
    import sys

    path = make_tiny_checkpoint("llama", tmp_path / "m")
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(d | {"hidden_size": "64"}))
    run = subprocess.run([sys.executable, "-P", "-m", "minilora.generate", "--model", str(path), "--prompt", "a"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (f"error: {path}/config.json: hidden_size must be an integer, got '64' (str); "
                                  "fix config.json (JSON numbers and booleans are written without quotes)")
