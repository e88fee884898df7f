"""`python -m minilora.merge --model DIR --adapter DIR --output DIR`: fold a LoRA adapter into its base model.

The result is an ordinary Hugging Face checkpoint (config.json + safetensors) holding W0 + (alpha/r)·B·A in each
adapted layer, so any tool that reads Hugging Face models (transformers, llama.cpp's converter, vLLM) runs the
fine-tuned model with no LoRA code and no extra cost per token. The adapter may come from minilora or PEFT.

Steps: load the base model (checkpoint.load_model), add the adapter's LoRA layers (adapter.load_adapter), replace
each by its merged linear (lora.merge_lora; the sum is formed in float32 and rounded once to the checkpoint's
dtype), save (checkpoint.save_model), and copy the tokenizer and generation files so the folder is complete.

`--format gguf` writes one llama.cpp GGUF file instead (formats/gguf_write.py: `--gguf-type` f16, bf16 or q8_0), with
the tokenizer and chat template inside, for llama.cpp, Ollama or LM Studio.

Not handled: merging into a 4-bit base in place (merge a full-precision copy of the base instead), several
adapters at once.
"""

import argparse
import sys
from pathlib import Path

from .config import SUPPORTED_DTYPES
from .errors import MiniloraError, run_cli
from .files import copy_companion_files


def merge(model_dir, adapter_dir, output_dir, dtype=None, format="safetensors", gguf_type="f16") -> Path:
    """Write the merged model to `output_dir` (a folder; for format "gguf" a .gguf file, or a folder to hold
    model-<gguf_type>.gguf); return the folder or file."""
    from .adapter import load_adapter, read_adapter_config
    from .formats.safetensors_folder import load_model, save_model
    from .lora import merge_lora

    model_dir, adapter_dir, output_dir = Path(model_dir), Path(adapter_dir), Path(output_dir)
    read_adapter_config(adapter_dir)  # fail fast, before loading a possibly large model
    if output_dir.exists() and not output_dir.is_dir():
        raise MiniloraError(f"--output {output_dir} exists and is not a folder")
    if output_dir.resolve() in (model_dir.resolve(), adapter_dir.resolve()):
        raise MiniloraError(f"--output {output_dir} is the model or adapter folder; choose a new folder "
                            "(merging in place would overwrite the base weights)")
    model = load_model(model_dir, dtype=dtype)
    names = load_adapter(model, adapter_dir)
    merge_lora(model)
    if format == "gguf":
        return _save_gguf(model, model_dir, adapter_dir, output_dir, gguf_type, len(names))
    save_model(model, output_dir)
    copy_companion_files(model_dir, output_dir)  # tokenizer.json, tokenizer_config.json, generation_config.json, ...
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
    parser.add_argument("--model", required=True, help="base model folder (Hugging Face format)")
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder (PEFT format)")
    parser.add_argument("--output", required=True, help="folder for the merged model (--format gguf: a .gguf file "
                        "or a folder)")
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None,
                        help="dtype of the merged weights (default: the base checkpoint's)")
    parser.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                        help="safetensors: a Hugging Face folder; gguf: one llama.cpp file (needs the gguf extra)")
    parser.add_argument("--gguf-type", choices=("f16", "bf16", "q8_0", "f32"), default="f16",
                        help="--format gguf: type of the matrices (norms and biases stay f32)")
    args = parser.parse_args(argv)
    merge(args.model, args.adapter, args.output, dtype=args.dtype, format=args.format, gguf_type=args.gguf_type)
    return 0


def cli() -> None:
    """Console-script entry point: user mistakes print one line and exit 1 (no traceback)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
