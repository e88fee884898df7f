"""Load and save Hugging Face model folders (config.json + safetensors) without transformers.

Loading (`load_model`): read config.json, build the Transformer on the *meta* device (shapes only, no memory, no
random init), read each tensor from the safetensors file(s) straight onto the target device in the target dtype,
and hand them to the modules with `load_state_dict(assign=True)`, which adopts the tensors instead of copying into
freshly allocated ones. Peak memory is therefore about one copy of the weights (plus one tensor being converted),
not two. (On CPU the file is also memory-mapped while it is read; those pages are page cache the OS can drop.)
Both layouts are read: a single `model.safetensors`, or shards listed by `model.safetensors.index.json`
(`{"weight_map": {tensor name: file}}`).

Every tensor is checked: missing, unexpected or mis-shaped tensors are a MiniloraError naming the tensor and file.
Two kinds of extra tensor are tolerated because released checkpoints contain them: `lm_head.weight` when the
embeddings are tied, and the rotary `inv_freq` buffers some old checkpoints saved.

Saving (`save_model`): the original config.json (dtype updated) and the state dict as safetensors, sharded above
`shard_size`, all written atomically — transformers loads the result (e.g. a merged LoRA model).

Not handled: PyTorch `.bin` pickles (unsafe to load; convert to safetensors), 4-bit loading (the `quantize` hook).
"""

import json
import re
from pathlib import Path

import torch

from .atomic import save_safetensors, write_json
from .config import SUPPORTED_DTYPES, load_config
from .errors import MiniloraError
from .model import Transformer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
QUANTIZE_CHOICES = ("nf4",)
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def load_model(path, dtype=None, device=None, quantize=None, quant_backend: str = "auto") -> Transformer:
    """Build the model described by `path`/config.json and load its weights; returns it in eval mode.

    dtype: torch dtype or name ("float32", "bfloat16", "float16"); default: config.json's dtype, else float32.
    device: where the weights go (default "cpu"). quantize: None, or "nf4" for a 4-bit frozen base (QLoRA);
    quant_backend: passed on to the quantized layers ("auto", "triton" or "torch").
    """
    path = Path(path)
    config = load_config(path)  # checks the folder and config.json
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise MiniloraError(f"quantize must be None or one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    dtype = resolve_dtype(dtype if dtype is not None else (config.dtype or "float32"))
    device = torch.device(device or "cpu")
    files = weight_files(path)

    with torch.device("meta"):
        model = Transformer(config)  # shapes only: no memory, no random init
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = read_state_dict(files, expected, dtype, device, config.tie_word_embeddings)
    missing = sorted(set(expected) - set(state))
    if missing:
        where = ", ".join(f.name for f in files)
        raise MiniloraError(
            f"{path}: tensor {missing[0]!r} is missing from {where}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; the checkpoint does not match its config.json ({config.model_type})"
        )
    model.load_state_dict(state, strict=True, assign=True)
    if quantize is not None:
        quantize_model(model, quantize, quant_backend)
    return model.eval()


def quantize_model(model: Transformer, quantize: str, quant_backend: str = "auto") -> None:
    """Hook for QLoRA: replace the frozen block linears by 4-bit ones (to be filled in by nf4_linear.py's owner)."""
    raise MiniloraError(f"quantize={quantize!r} not available yet")


def resolve_dtype(dtype) -> torch.dtype:
    """torch.dtype from a dtype or its name; MiniloraError for anything but float32/bfloat16/float16."""
    name = str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16"
    if name not in SUPPORTED_DTYPES:
        raise MiniloraError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {dtype!r}")
    return getattr(torch, name)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards named by the index, or model.safetensors."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MiniloraError(f"{index} is not a valid safetensors index ({e!r})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise MiniloraError(f"{index} lists {f.name}, which is not in {path}")
        return files
    single = path / SINGLE_NAME
    if single.is_file():
        return [single]
    hint = " (found pytorch_model*.bin: convert it to safetensors)" if list(path.glob("pytorch_model*.bin")) else ""
    raise MiniloraError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}{hint}")


def read_state_dict(files, expected: dict, dtype, device, tied: bool) -> dict[str, torch.Tensor]:
    """Read every tensor of `files` onto `device` in `dtype`, checking names and shapes against `expected`."""
    from safetensors import SafetensorError, safe_open

    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as reader:
                for name in reader.keys():
                    if _IGNORED.search(name) or (tied and name == "lm_head.weight" and name not in expected):
                        continue
                    if name not in expected:
                        raise MiniloraError(f"unexpected tensor {name!r} in {f}: the model described by "
                                            "config.json has no such weight")
                    shape = tuple(reader.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise MiniloraError(f"tensor {name!r} in {f} has shape {shape}, "
                                            f"config.json implies {expected[name]}")
                    t = reader.get_tensor(name)
                    state[name] = t.to(dtype) if t.is_floating_point() else t
        except SafetensorError as e:
            raise MiniloraError(f"cannot read {f}: not a valid safetensors file ({e})") from None
        except OSError as e:
            raise MiniloraError(f"cannot read {f}: {e}") from None
    return state


def save_model(model: Transformer, out_dir, shard_size: int = 5 * 2**30) -> Path:
    """Write `out_dir`/config.json and the weights (model.safetensors, or shards + index above `shard_size` bytes).

    Stale weight files of an earlier save in `out_dir` are removed so the folder holds exactly one model.
    """
    out_dir = Path(out_dir)
    state = model.state_dict()
    if any("lora_" in name for name in state):
        raise MiniloraError("the model still has LoRA layers: merge them (minilora.lora.merge_lora) before save_model")
    if not model.config.hf_config:
        raise ValueError("save_model needs model.config.hf_config (the config.json the model was loaded from)")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _split(state, shard_size)
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_safetensors(out_dir / name, shard, metadata={"format": "pt"})  # transformers requires format=pt
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob(INDEX_NAME)):
        if stale.name not in names and not (len(shards) > 1 and stale.name == INDEX_NAME):
            stale.unlink()
    write_json(out_dir / "config.json", _config_for_save(model))
    return out_dir


def _split(state: dict, shard_size: int) -> list[dict]:
    """Greedy sharding in state-dict order: start a new shard when the next tensor would overflow this one."""
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _config_for_save(model: Transformer) -> dict:
    """The original config.json, with its dtype field set to the weights' actual dtype."""
    config = dict(model.config.hf_config)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = dtype
    return config
