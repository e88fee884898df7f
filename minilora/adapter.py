"""Save and load LoRA adapters in PEFT's format, so they move freely between minilora and Hugging Face PEFT.

Format (what `peft.PeftModel.save_pretrained` writes, PEFT 0.21):
- `adapter_config.json`: a LoraConfig as JSON — `peft_type: "LORA"`, `task_type: "CAUSAL_LM"`, `r`,
  `lora_alpha`, `lora_dropout`, `target_modules` (a list of name suffixes / full names, or one regular
  expression), `use_rslora`, `bias: "none"`, `base_model_name_or_path`, ...
- `adapter_model.safetensors`: `base_model.model.<module path>.lora_A.weight` (r, d_in) and `.lora_B.weight`
  (d_out, r); for DoRA (`use_dora: true`) also `.lora_magnitude_vector` (d_out,), the learned magnitude m.
  `<module path>` is the name in the transformers model (`model.layers.0.self_attn.q_proj`), which is also
  minilora's, and PEFT leaves the adapter name ("default") out of saved keys.
Older adapters saved as `adapter_model.bin` (a pickled state dict) load too, with torch's safe weights_only reader.

Not handled (a clear error instead): per-module ranks or alphas (`rank_pattern`, `alpha_pattern`), LoRA
biases, `modules_to_save`, `layers_to_transform`, `exclude_modules`, other PEFT methods than LoRA.
"""

import json
from pathlib import Path

import torch
from torch import nn

from .files import read_json_object, save_safetensors, write_json
from .errors import MiniloraError
from .dora import DoRALinear
from .lora import LoRALinear, apply_lora, linear_names, select_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel.base_model (the LoraModel) .model (the transformers model)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _shared(modules: dict[str, LoRALinear], attr) -> object:
    values = {attr(m) for m in modules.values()}
    if len(values) != 1:
        raise MiniloraError(f"LoRA layers differ in {sorted(values)}; PEFT's format needs one value for all "
                            "(per-module rank_pattern/alpha_pattern is not supported)")
    return values.pop()


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The shortest `target_modules` that selects exactly `names` under PEFT's suffix rule.

    Usually the distinct last components (["q_proj", "v_proj"]); if those would also select a linear we did not
    wrap (e.g. only some layers were targeted), the full module names.
    """
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    candidates = set(linear_names(model)) | set(names)
    selected = {n for n in candidates if any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if selected == set(names) else sorted(names)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under PEFT's key names."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        state[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
        if isinstance(m, DoRALinear):
            state[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach()
    return state


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (atomically) for the model's LoRA layers.

    r, alpha, dropout, rsLoRA and the targets are read from the LoRALinear modules themselves, so the config
    cannot disagree with the weights. Returns the folder.
    """
    modules = lora_modules(model)
    if not modules:
        raise MiniloraError("the model has no LoRA layers to save; call apply_lora(model, ...) first")
    if any(m.merged for m in modules.values()):
        raise MiniloraError("some LoRA layers are merged into their base weight; unmerge() them before saving")
    out_dir = Path(out_dir)
    config = {
        # The LoraConfig fields PEFT has written for many releases; PEFT fills in any newer field with its default.
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None,
        "inference_mode": True,  # PEFT writes true on save; PeftModel.from_pretrained(is_trainable=True) overrides
        "r": _shared(modules, lambda m: m.r),
        "lora_alpha": _shared(modules, lambda m: m.alpha),
        "lora_dropout": _shared(modules, lambda m: m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0),
        "use_rslora": _shared(modules, lambda m: m.use_rslora),
        "target_modules": _target_modules(model, list(modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": _shared(modules, lambda m: isinstance(m, DoRALinear)),
    }
    save_safetensors(out_dir / WEIGHTS_NAME, adapter_state_dict(model), metadata={"format": "pt"})
    write_json(out_dir / CONFIG_NAME, config)
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """Read and check adapter_config.json; raise MiniloraError for anything this loader cannot reproduce."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise MiniloraError(f"{path} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = read_json_object(path, hint="re-save the adapter")
    if config.get("peft_type", "LORA") != "LORA":
        raise MiniloraError(f"{path}: peft_type is {config['peft_type']!r}; only LORA adapters are supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise MiniloraError(f"{path}: field {field!r} is missing")
    unsupported = {  # field: the value that means "not used"
        "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "layers_to_transform": None, "exclude_modules": None, "lora_bias": False,
        "target_parameters": None, "trainable_token_indices": None, "layer_replication": None,
        "use_qalora": False, "alora_invocation_tokens": None,
    }
    for field, default in unsupported.items():
        value = config.get(field, default)
        if value != default and not (default is None and value in ([], {})):
            raise MiniloraError(f"{path}: {field}={value!r} is not supported by minilora "
                                f"(only plain LoRA: {field} must be {json.dumps(default)})")
    # PiSSA, OLoRA, LoftQ, ... also change the base weights at initialisation, so their A/B alone do not reproduce
    # the model (PEFT can convert such an adapter to plain LoRA when saving: path_initial_model_for_weight_conversion).
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian") or config.get("loftq_config") not in (None, {}):
        raise MiniloraError(f"{path}: init_lora_weights={init!r} / loftq_config change the base model too; only "
                            "plain LoRA adapters are supported (convert it to plain LoRA with PEFT first)")
    return config


def _read_weights(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors by key, and the file they came from."""
    st, bin_ = adapter_dir / WEIGHTS_NAME, adapter_dir / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(st)), st
        except (SafetensorError, OSError) as e:
            raise MiniloraError(f"{st} is not a readable safetensors file: {e}") from None
    if bin_.is_file():
        try:
            state = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle can fail in many ways; all mean "not a state dict we can read"
            raise MiniloraError(f"{bin_} could not be read as a state dict: {e}") from None
        if not isinstance(state, dict):
            raise MiniloraError(f"{bin_} holds a {type(state).__name__}, not a state dict")
        return state, bin_
    raise MiniloraError(f"{st} not found: the adapter folder has {CONFIG_NAME} but no weights file")


def load_adapter(model: nn.Module, adapter_dir: str | Path, dtype: torch.dtype = torch.float32) -> list[str]:
    """Add the LoRA layers described by a PEFT adapter folder to `model` and load their weights.

    Everything but A and B (and DoRA's magnitude) is frozen (they stay trainable, so training can continue). Returns the names of the
    wrapped modules. Raises MiniloraError on a missing file, a target that matches nothing, a missing, unknown or
    wrongly shaped tensor.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights, where = _read_weights(adapter_dir)  # read before touching the model, so a bad file leaves it unchanged
    if lora_modules(model):
        raise MiniloraError("the model already has LoRA layers; load the adapter into a fresh model")
    # Check every tensor against the layers it will go into before changing the model.
    names = select_targets(model, config["target_modules"])
    r, dora = config["r"], bool(config.get("use_dora"))
    expected = {}
    for name in names:
        base = model.get_submodule(name)
        expected[f"{PREFIX}{name}.lora_A.weight"] = (r, base.in_features)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (base.out_features, r)
        if dora:
            expected[f"{PREFIX}{name}.lora_magnitude_vector"] = (base.out_features,)
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise MiniloraError(f"{where}: {len(unknown)} tensor(s) match no LoRA layer of this model, e.g. "
                            f"{unknown[0]!r} (is the adapter for another architecture?)")
    missing = sorted(set(expected) - set(weights))
    if dora and any(k.endswith(".lora_magnitude_vector") for k in missing):
        raise MiniloraError(f"{where}: adapter_config.json says use_dora=true but the weights have no "
                            f"lora_magnitude_vector for {len(missing)} layer(s); is it a plain LoRA adapter?")
    if missing:
        raise MiniloraError(f"{where}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise MiniloraError(f"{where}: {key} has shape {tuple(weights[key].shape)}, the model expects {shape} "
                                f"(r={r}; is the adapter for another model size?)")

    apply_lora(model, r=r, alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0,
               targets=names, use_rslora=bool(config.get("use_rslora")), dtype=dtype,
               layer=DoRALinear if dora else LoRALinear)
    with torch.no_grad():
        for name in names:
            m = model.get_submodule(name)
            m.lora_A.weight.copy_(weights[f"{PREFIX}{name}.lora_A.weight"])
            m.lora_B.weight.copy_(weights[f"{PREFIX}{name}.lora_B.weight"])
            if dora:
                m.lora_magnitude_vector.copy_(weights[f"{PREFIX}{name}.lora_magnitude_vector"])
    return names
