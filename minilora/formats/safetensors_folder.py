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

4-bit (QLoRA, `quantize="nf4"`): the linears inside the blocks become frozen NF4Linear layers (blocksize 64, double
quantization, compute dtype = `dtype`). Each such weight is quantized the moment it is read and its 16/32-bit copy
freed before the next tensor is read, so the peak is the 4-bit model + the unquantized weights + one tensor being
quantized — never the whole model in 16/32 bits. Measured by benchmarks/load_memory.py (8 layers of TinyLlama's
shape, a bf16 file loaded as fp32, CPU): peak 983 MiB for a 673 MiB model, against 1,920 MiB for the dense model
and 2,074 MiB for dense-then-quantize; the excess over the model is mostly quantize_nf4's temporaries, ~30 bytes
per weight of the tensor being quantized (the largest has 11.5 M weights).
A checkpoint that transformers + bitsandbytes saved in 4-bit (config.json `quantization_config`) is read as stored,
without re-quantizing, and `save_model` writes a 4-bit model in that same format (see quant/bnb_checkpoint.py).

Not handled: PyTorch `.bin` pickles (unsafe to load; convert to safetensors), FP4/8-bit/GPTQ/AWQ checkpoints.
"""

import json
import re
from pathlib import Path

import torch

from ..files import save_safetensors, write_json
from ..config import SUPPORTED_DTYPES, load_config
from ..errors import MiniloraError
from ..model import Transformer
from ..quant.nf4 import quantize_nf4
from ..quant.nf4_linear import NF4Linear
from ..quant.bnb_checkpoint import (BLOCKSIZE, block_linear_names, checkpoint_quantization, four_bit_module,
                                   gather_nf4, install_nf4_linears, quantization_config, share_code_tables, unshare)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
QUANTIZE_CHOICES = ("nf4",)
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors header names of the dtypes a dense weight may have
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def load_model(path, dtype=None, device=None, quantize=None, quant_backend: str = "auto", shard=None) -> Transformer:
    """Build the model described by `path`/config.json and load its weights; returns it in eval mode.

    dtype: torch dtype or name ("float32", "bfloat16", "float16"); default: config.json's dtype, else float32.
    device: where the weights go (default "cpu"). quantize: None, or "nf4" for a 4-bit frozen base (QLoRA): the
    block linears become NF4Linear with compute dtype `dtype`. A bitsandbytes 4-bit checkpoint is always loaded
    as 4-bit. quant_backend: the NF4Linear matmul ("auto": Triton on GPU, PyTorch on CPU; "triton"; "torch").
    shard: (rank, world_size) under FSDP2 with quantize="nf4": each rank reads and quantizes only its rows of the
    block linears (quant/nf4_tensor.py quantize_shard; a collective, so every rank loads the same model).
    A .gguf file, or a folder holding one and no config.json, is read by gguf_read.py instead.
    """
    from .gguf_read import find_gguf, load_gguf_model

    if find_gguf(path) is not None:
        return load_gguf_model(path, dtype=dtype, device=device, quantize=quantize, quant_backend=quant_backend)
    path = Path(path)
    config = load_config(path)  # checks the folder and config.json
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise MiniloraError(f"quantize must be None or one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    prequantized = checkpoint_quantization(config.hf_config, path)  # None or "nf4"
    quantize = prequantized or quantize
    dtype = resolve_dtype(dtype if dtype is not None else (config.dtype or "float32"))
    device = torch.device(device or "cpu")
    files = weight_files(path)

    with torch.device("meta"):
        model = Transformer(config)  # shapes only: no memory, no random init
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    targets = block_linear_names(model) if quantize else []
    state = read_state_dict(files, expected, dtype, device, config.tie_word_embeddings,
                            quantize=() if prequantized else {f"{n}.weight" for n in targets},
                            prequantized=set(targets) if prequantized else (), shard=shard)
    if prequantized:
        gather_nf4(state, targets, expected, path)
    missing = sorted(set(expected) - set(state))
    if missing:
        where = ", ".join(f.name for f in files)
        raise MiniloraError(
            f"{path}: tensor {missing[0]!r} is missing from {where}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; the checkpoint does not match its config.json ({config.model_type})"
        )
    install_nf4_linears(model, state, dtype, quant_backend)  # no-op unless quantized
    # strict=False: the NF4Linears already hold their tensors; every name was checked against `expected` above.
    model.load_state_dict(state, strict=not quantize, assign=True)
    return model.eval()


def quantize_model(model: Transformer, quantize: str = "nf4", quant_backend: str = "auto") -> Transformer:
    """Replace the block linears of an already loaded model by NF4Linear (in place; returns the model).

    load_model(path, quantize="nf4") gives the same layers with less peak memory; this is for models built in
    memory. Each layer computes in its dense weight's dtype.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise MiniloraError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    tables = {}
    for name in block_linear_names(model):  # one at a time: each dense weight is dropped once replaced
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        q = share_code_tables(quantize_nf4(linear.weight.detach(), BLOCKSIZE, double_quant=True), tables)
        setattr(model.get_submodule(parent), child, NF4Linear(q, linear.bias, linear.weight.dtype, quant_backend))
    return model


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


def read_state_dict(files, expected: dict, dtype, device, tied: bool, quantize=(), prequantized=(),
                    shard=None) -> dict:
    """Read every tensor of `files` onto `device` in `dtype`, checking names and shapes against `expected`.

    quantize: weight names to quantize to NF4 as soon as they are read (their value is an NF4Weight).
    prequantized: module names whose 4-bit tensors ("<m>.weight", "<m>.weight.absmax", ...) are kept as stored.
    shard: (rank, world_size): the `quantize` weights are read and quantized a row range per rank (NF4Tensor).
    """
    from safetensors import SafetensorError, safe_open

    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as reader:
                for name in reader.keys():
                    if _IGNORED.search(name) or (tied and name == "lm_head.weight" and name not in expected):
                        continue
                    if prequantized and four_bit_module(name, prequantized):
                        state[name] = reader.get_tensor(name)  # no dtype cast: codes and fp32 scales as stored
                        continue
                    if name not in expected:
                        raise MiniloraError(f"unexpected tensor {name!r} in {f}: the model described by "
                                            "config.json has no such weight")
                    header = reader.get_slice(name)
                    shape = tuple(header.get_shape())
                    if shape != expected[name]:
                        raise MiniloraError(f"tensor {name!r} in {f} has shape {shape}, "
                                            f"config.json implies {expected[name]}")
                    if header.get_dtype() not in FLOAT_DTYPES:  # e.g. I32 bytes where F32 belongs: same size
                        raise MiniloraError(f"tensor {name!r} in {f} has dtype {header.get_dtype()}, but every "
                                            f"weight of this model is floating point ({', '.join(FLOAT_DTYPES)}); "
                                            "the file is corrupt or not this model's: re-download or re-save it")
                    if shard is not None and name in quantize:  # only this rank's rows are read (FSDP2)
                        from ..quant.nf4_tensor import quantize_shard

                        state[name] = quantize_shard(header, shape, dtype, BLOCKSIZE, device, *shard)
                        continue
                    t = reader.get_tensor(name).to(dtype)
                    # Quantize now, and drop our reference (del), so this 16/32-bit copy is freed before the next
                    # tensor is read.
                    state[name] = quantize_nf4(t, BLOCKSIZE, double_quant=True) if name in quantize else t
                    del t
        except SafetensorError as e:
            raise MiniloraError(f"cannot read {f}: not a valid safetensors file ({e})") from None
        except OSError as e:
            raise MiniloraError(f"cannot read {f}: {e}") from None
    return state


def save_model(model: Transformer, out_dir, shard_size: int = 5 * 2**30) -> Path:
    """Write `out_dir`/config.json and the weights (model.safetensors, or shards + index above `shard_size` bytes).

    A 4-bit model is written in the transformers + bitsandbytes format, with its `quantization_config`; for a
    16-bit export of it, call quantized_checkpoint.dequantize_model(model, torch.bfloat16) first.

    Stale weight files of an earlier save in `out_dir` are removed so the folder holds exactly one model.
    """
    out_dir = Path(out_dir)
    state = model.state_dict()  # a 4-bit model gives bitsandbytes' keys (NF4Linear._save_to_state_dict)
    if any("lora_" in name for name in state):
        raise MiniloraError("the model still has LoRA layers: merge them (minilora.lora.merge_lora) before save_model")
    if not model.config.hf_config:
        raise ValueError("save_model needs model.config.hf_config (the config.json the model was loaded from)")
    config = _config_for_save(model)  # before writing anything: refuses a half-4-bit model
    state = unshare(state)
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
    write_json(out_dir / "config.json", config)
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
    """The original config.json, with its dtype field set to the weights' actual dtype and the
    `quantization_config` of a 4-bit model (removed from a model that is no longer 4-bit)."""
    config = dict(model.config.hf_config)
    config.pop("quantization_config", None)
    quantized = quantization_config(model)
    if quantized is not None:
        config["quantization_config"] = quantized
    dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = dtype
    return config
