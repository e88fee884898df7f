"""`python -m minilora.merge --model DIR --adapter DIR --output DIR`: fold a LoRA adapter into its base model.

The result is an ordinary Hugging Face checkpoint (config.json + safetensors) holding W0 + (alpha/r)·B·A in each
adapted layer, so any tool that reads Hugging Face models (transformers, llama.cpp's converter, vLLM) runs the
fine-tuned model with no LoRA code and no extra cost per token. The adapter may come from minilora or PEFT.

Steps: load the base model (checkpoint.load_model), add the adapter's LoRA layers (adapter.load_adapter), replace
each by its merged linear (lora.merge_lora; the sum is formed in float32 and rounded once to the checkpoint's
dtype), save (checkpoint.save_model), and copy the tokenizer and generation files so the folder is complete.

A QLoRA adapter was trained on the 4-bit (NF4) base, not on the 16-bit weights: merged into the 16-bit base
it gives a slightly different model (logits up to ~2 apart on the tiny test models). When the adapter folder says
so (minilora_base.json, written by the trainer), the command prints once the largest logit difference between the
merged model and the trained one (4-bit base + adapter) on a probe batch. `--base nf4` merges into the
dequantized 4-bit weights instead: exactly the model that was trained, written as a 16-bit checkpoint.

    python -m minilora.merge --model default --adapter runs/default-qlora/adapter --output merged/ --base nf4

`--format gguf` writes one llama.cpp GGUF file instead (formats/gguf_write.py: `--gguf-type` f16, bf16 or q8_0), with
the tokenizer and chat template inside, for llama.cpp, Ollama or LM Studio.

Not handled: writing the merged model back in 4 bits, several adapters at once.
"""

import argparse
import sys
from pathlib import Path

import torch

from .config import SUPPORTED_DTYPES
from .errors import MiniloraError, run_cli
from .model_names import resolve_model


BASES = ("checkpoint", "nf4")  # merge into the weights as stored, or into their dequantized NF4 version


def trained_logits(model_dir: Path, adapter_dir: Path, dtype, probe):
    """Logits of the model as QLoRA trained it (NF4 base + unmerged adapter) on the probe batch."""
    from .adapter import load_adapter
    from .formats import load_model

    model = load_model(model_dir, dtype=dtype, quantize="nf4")
    load_adapter(model, adapter_dir)  # LoRA weights in float32, as the trainer keeps them
    with torch.no_grad():
        return model(probe).float()  # (B, T, vocab)


def merge(model_dir, adapter_dir, output_dir, dtype=None, base="checkpoint", format="safetensors",
          gguf_type="f16") -> Path:
    """Write the merged model to `output_dir` (a folder; for format "gguf" a .gguf file, or a folder to hold
    model-<gguf_type>.gguf); return the folder or file. base: "checkpoint" or "nf4" (see above)."""
    from .adapter import load_adapter, read_adapter_config
    from .checkpointing import TRAINED_ON
    from .formats import load_model, save_companion_files, save_model
    from .lora import merge_lora
    from .quant import dequantize_model

    if base not in BASES:
        raise MiniloraError(f"--base must be one of {', '.join(BASES)}, got {base!r}")
    model_dir = Path(resolve_model(str(model_dir)))
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    read_adapter_config(adapter_dir)  # fail fast, before loading a possibly large model
    if output_dir.exists() and not output_dir.is_dir():
        raise MiniloraError(f"--output {output_dir} exists and is not a folder")
    if output_dir.resolve() in (model_dir.resolve(), adapter_dir.resolve()):
        raise MiniloraError(f"--output {output_dir} is the model or adapter folder; choose a new folder "
                            "(merging in place would overwrite the base weights)")
    on_nf4 = (adapter_dir / TRAINED_ON).is_file()  # a QLoRA adapter: trained on the 4-bit base
    model = load_model(model_dir, dtype=dtype, quantize="nf4" if base == "nf4" else None)
    config = model.config  # (read from config.json or GGUF metadata)
    probe = torch.randint(0, config.vocab_size, (2, min(32, config.max_position_embeddings)),
                          generator=torch.Generator().manual_seed(0))  # (B, T) token ids
    reference = trained_logits(model_dir, adapter_dir, dtype, probe) if on_nf4 or base == "nf4" else None
    names = load_adapter(model, adapter_dir)
    merge_lora(model)
    dequantize_model(model)  # base nf4: the layers without an adapter become dense too (no-op otherwise)
    if reference is not None:
        with torch.no_grad():
            gap = float((model(probe).float() - reference).abs().max())
        where = f"max |Δ logit| on a {probe.shape[0]}×{probe.shape[1]} probe batch"
        if base == "nf4":
            print(f"note: merged into the dequantized 4-bit (NF4) weights: the logits are at most {gap:.4g} from "
                  f"the 4-bit base + adapter's, the model QLoRA trains ({where})")
        else:
            print(f"note: this adapter was trained on a 4-bit (NF4) base; merged into the base checkpoint's weights, "
                  f"the logits are at most {gap:.4g} from the trained model's ({where}); --base nf4 merges into "
                  "the dequantized 4-bit weights instead, exactly the model that was trained")
    if format == "gguf":
        return _save_gguf(model, model_dir, adapter_dir, output_dir, gguf_type, len(names))
    save_model(model, output_dir)
    save_companion_files(model_dir, output_dir)  # tokenizer.json, tokenizer_config.json, generation_config.json, ...
    print(f"merged {len(names)} LoRA layers of {adapter_dir} into {model_dir}: wrote {output_dir}")
    return output_dir


def _save_gguf(model, model_dir: Path, adapter_dir: Path, output: Path, gguf_type: str, n_layers: int) -> Path:
    from .formats import find_gguf, save_gguf
    from .tokenizer import load_tokenizer

    path = output if output.suffix == ".gguf" else output / f"model-{gguf_type}.gguf"
    save_gguf(model, load_tokenizer(model_dir), path, gguf_type, name=f"{model_dir.name} + {adapter_dir.name}",
              source=find_gguf(model_dir))
    print(f"merged {n_layers} LoRA layers of {adapter_dir} into {model_dir}: wrote {path} ({gguf_type})")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minilora.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="base model folder (Hugging Face format), or "
                        "'default' (the shipped tiny model)")
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder (PEFT format)")
    parser.add_argument("--output", required=True, help="folder for the merged model (--format gguf: a .gguf file "
                        "or a folder)")
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None,
                        help="dtype of the merged weights (default: the base checkpoint's)")
    parser.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                        help="safetensors: a Hugging Face folder; gguf: one llama.cpp file (needs the gguf extra)")
    parser.add_argument("--gguf-type", choices=("f16", "bf16", "q8_0", "f32"), default="f16",
                        help="--format gguf: type of the matrices (norms and biases stay f32)")
    parser.add_argument("--base", choices=BASES, default="checkpoint",
                        help="merge into the base weights as stored (default), or into their dequantized 4-bit NF4 "
                        "version: exactly the model a QLoRA adapter was trained with")
    args = parser.parse_args(argv)
    merge(args.model, args.adapter, args.output, dtype=args.dtype, base=args.base, format=args.format,
          gguf_type=args.gguf_type)
    return 0


def cli() -> None:
    """Console-script entry point: user mistakes print one line and exit 1 (no traceback)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
