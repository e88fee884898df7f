"""4-bit models on disk and in memory: the transformers + bitsandbytes checkpoint format, and what a 4-bit model weighs.

QLoRA (Dettmers et al., 2023) keeps the frozen base in 4-bit NF4. checkpoint.py builds such a model in two ways —
quantizing a 16/32-bit checkpoint while it is read, or reading one that is already 4-bit — and this file holds the
pieces specific to 4 bits:

- Which linears are quantized: those inside the transformer blocks (attention and MLP projections). Embeddings,
  norms and the vocabulary head stay in the compute dtype, as in the QLoRA paper and in transformers (which leaves
  `lm_head` out) — they are a small share of a large model's weights, and the head is sensitive to rounding.
- The format transformers + bitsandbytes write (`save_pretrained` of a model loaded with
  `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`): config.json carries a `quantization_config`
  with `quant_method: "bitsandbytes"`, and each quantized linear `<name>` stores six tensors:
      <name>.weight                                  uint8 [(numel + 1) // 2, 1]  two NF4 codes per byte
      <name>.weight.absmax                           uint8 codes per 64-block (fp32 scales without double quant)
      <name>.weight.quant_map                        fp32 (16,)   the NF4 values
      <name>.weight.nested_absmax                    fp32 per 256 blocks (double quant only)
      <name>.weight.nested_quant_map                 fp32 (256,)  the 8-bit dynamic code (double quant only)
      <name>.weight.quant_state.bitsandbytes__nf4    uint8: the bytes of a JSON (shape, dtype, blocksize, offset)
  `NF4Weight.from_hf_state` / `to_hf_state` (nf4.py) translate one linear; here we group a checkpoint's tensors per
  linear and write the config entry.
- Memory: `model_memory` counts every tensor storage once, split into the 4-bit part and the rest.

Not handled (a MiniloraError says so): FP4 and 8-bit (LLM.int8) checkpoints, other quantization methods (GPTQ, AWQ,
...), bnb_4bit_quant_storage other than uint8, checkpoints whose block linears are only partly quantized
(`llm_int8_skip_modules` naming block linears).
"""

import re
from dataclasses import replace

import torch
from torch import nn

from ..cpu_matmul import Linear  # the model's own nn.Linear (training products through oneDNN)
from ..errors import MiniloraError
from .nf4 import NF4Weight
from .nf4_linear import NF4Linear

BLOCKSIZE = 64  # QLoRA's block size, and the one transformers uses for 4-bit
_FOUR_BIT_KEY = re.compile(r"^(?P<module>.+)\.weight(\..+)?$")  # "<module>.weight" and "<module>.weight.absmax", ...


def block_linear_names(model: nn.Module) -> list[str]:
    """The linears QLoRA quantizes: every nn.Linear inside `model.model.layers` (never embeddings, norms, lm_head)."""
    return [f"model.layers.{name}" for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]


# --- reading -------------------------------------------------------------------------------------------------------


def checkpoint_quantization(hf_config: dict, where) -> str | None:
    """None for an ordinary checkpoint, "nf4" for a bitsandbytes 4-bit NF4 one; MiniloraError for anything else."""
    q = hf_config.get("quantization_config")
    if q is None:
        return None
    method = q.get("quant_method")
    if method != "bitsandbytes":
        raise MiniloraError(f"{where}: config.json has a {method!r} quantization_config; only bitsandbytes 4-bit NF4 "
                            "checkpoints are supported (use the unquantized checkpoint and quantize='nf4')")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise MiniloraError(f"{where}: this is a bitsandbytes 8-bit (LLM.int8) checkpoint; only 4-bit NF4 is "
                            "supported (use the unquantized checkpoint and quantize='nf4')")
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        raise MiniloraError(f"{where}: quantization_config says neither load_in_4bit nor load_in_8bit")
    quant_type = q.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' default is fp4
    if quant_type != "nf4":
        raise MiniloraError(f"{where}: bnb_4bit_quant_type is {quant_type!r}; only 'nf4' checkpoints are supported "
                            "(FP4 is a different 4-bit code)")
    storage = q.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise MiniloraError(f"{where}: bnb_4bit_quant_storage {storage!r} is not supported (only uint8)")
    return "nf4"


def four_bit_module(name: str, modules: set[str]) -> str | None:
    """The quantized module a checkpoint tensor belongs to ("<m>.weight", "<m>.weight.absmax", ...), else None."""
    match = _FOUR_BIT_KEY.match(name)
    return match["module"] if match and match["module"] in modules else None


def gather_nf4(state: dict, modules: list[str], expected: dict, where) -> None:
    """In `state`, replace each module's stored 4-bit tensors by one NF4Weight at "<module>.weight" (in place)."""
    grouped = {m: {} for m in modules}
    for key in [k for k in state if four_bit_module(k, grouped.keys())]:
        grouped[four_bit_module(key, grouped.keys())][key] = state.pop(key)
    for module, tensors in grouped.items():
        key = f"{module}.weight"
        if key in tensors and tensors[key].is_floating_point():
            raise MiniloraError(f"{where}: {key} is not 4-bit although config.json says the checkpoint is; "
                                "checkpoints with unquantized block linears (llm_int8_skip_modules) are not supported")
        if tensors:  # none at all: reported as a missing tensor by the caller
            q = NF4Weight.from_hf_state(tensors, module)
            if q.absmax.dtype != (torch.uint8 if q.double_quant else torch.float32):  # e.g. a lost nested_absmax
                raise MiniloraError(f"{where}: {key}.absmax is {q.absmax.dtype} but the checkpoint "
                                    f"{'has' if q.double_quant else 'lacks'} {key}.nested_absmax; it is corrupt")
            if tuple(q.shape) != expected[key]:
                raise MiniloraError(f"{where}: 4-bit tensor {key!r} has shape {tuple(q.shape)}, "
                                    f"config.json implies {expected[key]}")
            state[key] = q


# --- building the 4-bit modules ------------------------------------------------------------------------------------


def install_nf4_linears(model: nn.Module, state: dict, compute_dtype: torch.dtype, backend: str) -> None:
    """Replace each linear whose "<name>.weight" in `state` is an NF4Weight by an NF4Linear (popping its tensors).

    Every layer's quant_map holds the same 16 NF4 values and every nested_quant_map the same 256 dynamic-code values:
    the layers share one copy of each (1088 bytes per linear saved; what `model_memory` counts).
    """
    from .nf4_tensor import NF4Tensor

    tables = {}
    for key in [k for k, v in state.items() if isinstance(v, (NF4Weight, NF4Tensor))]:
        name = key.removesuffix(".weight")
        q = state.pop(key)
        q = share_code_tables(q, tables) if isinstance(q, NF4Weight) else q  # NF4Tensor: one rank's rows
        layer = NF4Linear(q, state.pop(f"{name}.bias", None), compute_dtype, backend)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def share_code_tables(q: NF4Weight, tables: dict) -> NF4Weight:
    """`q` with its code tables replaced by equal ones already in `tables` (the first of each kind is kept)."""
    shared = {}
    for field in ("quant_map", "nested_quant_map"):
        t = getattr(q, field)
        if t is None:
            continue
        first = tables.setdefault((field, t.device), t)
        if first is not t and torch.equal(first, t):
            shared[field] = first
    return replace(q, **shared) if shared else q


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4Linear by an nn.Linear holding its dequantized weight; returns the model, no longer 4-bit.

    dtype: of the new linears and of every other floating-point parameter (e.g. torch.bfloat16 for a 16-bit
    export); default: each layer's compute dtype, other parameters unchanged. The weights are dequantized in fp32
    and rounded once. Use it before `save_model` for a 16-bit checkpoint of a 4-bit model (after `merge_lora`,
    which dequantizes only the layers it merges).
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            w = m.dequantize(torch.float32).to(dtype or m.compute_dtype)  # (out, in)
            linear = Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear.requires_grad_(False))
    return model.to(dtype) if dtype is not None else model


# --- writing -------------------------------------------------------------------------------------------------------


def quantization_config(model: nn.Module) -> dict | None:
    """config.json's `quantization_config` for a 4-bit model (the fields transformers' BitsAndBytesConfig writes),
    None for a model without NF4Linear; MiniloraError for a mix of 4-bit and dense block linears.
    (For a model without LoRA layers: save_model refuses those first.)"""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if not layers:
        return None
    dense = block_linear_names(model)
    if dense:
        raise MiniloraError(f"the model mixes 4-bit and dense block linears (e.g. {dense[0]}, merged by merge_lora?); "
                            "call dequantize_model(model, torch.bfloat16) first to save a 16-bit checkpoint")
    compute = {str(m.compute_dtype).removeprefix("torch.") for m in layers}
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": all(m.weight.double_quant for m in layers),
        "bnb_4bit_compute_dtype": compute.pop() if len(compute) == 1 else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
    }  # fmt: skip


def unshare(state: dict) -> dict:
    """Clone tensors that share memory with an earlier one (the shared code tables): safetensors refuses aliases."""
    seen, out = set(), {}
    for key, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


# --- memory --------------------------------------------------------------------------------------------------------


def model_memory(model: nn.Module) -> dict:
    """Bytes held by the model's tensors, each storage counted once.

    nf4: the 4-bit weights (packed codes + absmax codes + nested absmax + the code tables); nf4_params: how many
    weights they encode; other: every parameter and buffer (embeddings, norms, lm_head, biases, LoRA).
    bits_per_param: 8 · nf4 / nf4_params — QLoRA's 4 + 8/64 + 32/(64·256) ≈ 4.127 once layers span many blocks.
    """
    seen = set()

    def nbytes(t: torch.Tensor | None) -> int:
        if t is None or t.untyped_storage().data_ptr() in seen:
            return 0
        seen.add(t.untyped_storage().data_ptr())
        return t.untyped_storage().nbytes()

    nf4 = nf4_params = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            w = m.weight
            q = w if isinstance(w, NF4Weight) else w.template  # an NF4Tensor (FSDP2) holds some rows; tables aside
            nf4 += sum(nbytes(t) for t in (w.packed, w.absmax, q.nested_absmax, q.quant_map, q.nested_quant_map))
            nf4_params += q.numel if w is q else w.held[1] * q.shape[1]  # the weights this process holds
    other = sum(nbytes(t) for t in list(model.parameters()) + list(model.buffers()))
    return {"nf4": nf4, "nf4_params": nf4_params, "other": other, "total": nf4 + other,
            "bits_per_param": 8 * nf4 / nf4_params if nf4_params else None}


def memory_summary(model: nn.Module) -> str:
    """One line for logs: total size, and for a 4-bit model the 4-bit part and its bits per weight."""
    mem = model_memory(model)
    line = f"model memory: {mem['total'] / 2**20:,.2f} MiB"
    if mem["nf4_params"]:
        line += (f" = 4-bit linears {mem['nf4'] / 2**20:,.2f} MiB ({mem['nf4_params']:,} weights, "
                 f"{mem['bits_per_param']:.3f} bits each) + other weights {mem['other'] / 2**20:,.2f} MiB")
    return line
