"""Benchmark the NF4 kernels against bitsandbytes and a dense bf16 matmul on the layer shapes of real models.

GPU (the default when CUDA is available), for each weight shape (N, K) of Llama-3.2-1B and Llama-3-8B:
    dequantize       ours (Triton)                 vs  bnb dequantize_4bit
    decode, M=1,2,4  ours (GEMV)                   vs  bnb gemv_4bit (M=1), bnb.matmul_4bit (path recorded), cuBLAS bf16
    train forward    ours (nf4_linear_forward: fused GEMM below DENSE_MIN_M rows, dequantize + cuBLAS from there)
                     vs  bnb.matmul_4bit  vs  cuBLAS bf16
    train backward   grad_x: ours (nf4_linear_backward)  vs  bnb's backward ops (dequantize_4bit + matmul)  vs  cuBLAS
    routing          ours fused GEMM vs ours dequantize + cuBLAS for M = 16 ... 8192: the smallest M from which
                     dequantize + cuBLAS is faster, per shape — the measurement behind nf4_matmul.DENSE_MIN_M.
Timed with triton.testing.do_bench (median; it flushes the L2 cache before every run, so a 4-bit weight that fits
in the H100's 50 MB L2 is still read from HBM). Reported: time; effective GB/s = the least bytes the operation
must move (4-bit codes + scales + activations, or 2 bytes per weight for bf16) / time, whatever an implementation
really moves; % of the device's copy bandwidth (a 1 GiB device-to-device copy measured in the same run) and of
the datasheet HBM bandwidth; TFLOP/s; and time ratios to bnb and to cuBLAS on the same shape.

CPU (--device cpu or no GPU): our PyTorch reference (quantize, dequantize, dequantize + F.linear) vs bitsandbytes'
CPU path on smaller shapes, timed with torch.utils.benchmark (median of blocked runs).

--interpret (with TRITON_INTERPRET=1 in the environment): the GPU benchmark's code path on CPU tensors in the
Triton interpreter, on tiny shapes and with one untimed call each — a smoke run of this script, not a measurement.

Results: a table on stdout, plus benchmarks/results/nf4_<device>_<date>.md and .json with the machine they ran on.
No correctness is asserted here beyond a sanity check of every output against the dense reference (tests/ do that).

    python benchmarks/bench_nf4_kernels.py                 # GPU if present, else CPU
    OMP_NUM_THREADS=1 python benchmarks/bench_nf4_kernels.py --device cpu --threads 1
    TRITON_INTERPRET=1 python benchmarks/bench_nf4_kernels.py --interpret --no-save
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import harness
from minilora.quant.nf4 import dequantize_nf4, quantize_nf4

RESULTS = Path(__file__).resolve().parent / "results"

# (model, layer, N = out_features, K = in_features)
GPU_SHAPES = [
    ("Llama-3.2-1B", "q_proj", 2048, 2048),
    ("Llama-3.2-1B", "gate/up_proj", 8192, 2048),
    ("Llama-3.2-1B", "down_proj", 2048, 8192),
    ("Llama-3-8B", "q/o_proj", 4096, 4096),
    ("Llama-3-8B", "k/v_proj", 1024, 4096),
    ("Llama-3-8B", "gate/up_proj", 14336, 4096),
    ("Llama-3-8B", "down_proj", 4096, 14336),
]
CPU_SHAPES = [
    ("toy", "1024x1024", 1024, 1024),
    ("Llama-3.2-1B", "q_proj", 2048, 2048),
    ("Llama-3.2-1B", "gate/up_proj", 8192, 2048),
]
DATASHEET_GBPS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039}


# --- what bitsandbytes does for a given call (recorded next to its timings) -------------------------------------


def bnb_matmul_path(device: torch.device, M: int, N: int, K: int, dtype: torch.dtype, blocksize: int = 64) -> str:
    """Mirror of bnb 0.50's dispatch in matmul_4bit → gemm_4bit for a double-quantized weight."""
    if device.type == "cpu":
        return "gemm_4bit default: dequantize_4bit (C) + F.linear"
    try:
        from bitsandbytes.backends.cuda import ops as cuda_ops

        if M > cuda_ops._gemm_4bit_custom_max_m or K % blocksize:
            return "dequantize_4bit + F.linear (cuBLAS)"
        if cuda_ops._gemm_4bit_use_custom_fn(device.index or 0, dtype, M, N, K):
            return "gemm_4bit custom kernel (SIMT/MMA, chosen in C)"
        return "dequantize_4bit + F.linear (cuBLAS)"
    except (ImportError, AttributeError) as e:  # another bnb version: say so instead of guessing
        return f"unknown ({type(e).__name__}: {e})"


# --- timing -------------------------------------------------------------------------------------------------------


def time_gpu_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_cpu_ms(fn, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def copy_bandwidth_gbps() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_gpu_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9  # read + write


def check_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """Relative max error; a sanity check that every timed function computes the right thing."""
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()
    if err > 0.05:
        raise RuntimeError(f"{what}: relative error {err:.3g} — the benchmark would time a wrong result")
    return err


# --- GPU ----------------------------------------------------------------------------------------------------------

DECODE_MS = [1, 2, 4]  # the GEMV's M (one token; a few: small batches, speculative decoding)
CROSSOVER_MS = [16, 64, 256, 512, 1024, 2048, 4096, 8192]  # fused GEMM vs dequantize + cuBLAS


def bench_gpu(shapes, train_ms, decode_ms, crossover_ms, device="cuda", dt=torch.bfloat16, time_ms=time_gpu_ms):
    """(device, dtype, timer are parameters only so that the logic can be smoke-run on CPU in the interpreter.)"""
    rows = []
    for model, layer, N, K in shapes:
        rows += bench_gpu_shape(f"{model} {layer} {N}x{K}", N, K, train_ms, decode_ms, crossover_ms, device, dt,
                                time_ms)  # fmt: skip
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # this shape's tensors died with bench_gpu_shape's frame
    return rows


def bench_gpu_shape(shape, N, K, train_ms, decode_ms, crossover_ms, device, dt, time_ms):
    """Every row for one weight shape; all its tensors are locals, freed when it returns."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from minilora.kernels import nf4_matmul as mm
    from minilora.kernels.nf4_dequant import triton_dequantize

    dev = torch.device(device)
    torch.manual_seed(0)
    w = torch.randn(N, K, device=dev, dtype=dt) * 0.02
    q = quantize_nf4(w)  # ours, on the GPU
    packed, state = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    W = dequantize_nf4(q, dt)  # the dense weight for cuBLAS
    w_bytes = q.nbytes
    rows = []

    def add(op, M, impl, fn, nbytes, flops, path="", ref=None):
        if ref is not None:  # a fast but wrong implementation cannot post a result
            check_close(fn(), ref, f"{impl} {shape} M={M}")
        rows.append(dict(op=op, shape=shape, N=N, K=K, M=M, impl=impl, ms=time_ms(fn), bytes=nbytes, flops=flops,
                         path=path))  # fmt: skip

    # dequantize: 0.516 byte read + 2 written per weight
    add("dequantize", 0, "ours (Triton)", lambda: triton_dequantize(q, dt), w_bytes + 2 * N * K, 0, ref=W)
    add("dequantize", 0, "bnb dequantize_4bit", lambda: bnbF.dequantize_4bit(packed, state), w_bytes + 2 * N * K, 0,
        ref=W)  # fmt: skip

    with torch.no_grad():
        for M in decode_ms + train_ms:
            x = torch.randn(M, K, device=dev, dtype=dt)
            op = "decode" if M in decode_ms else "train fwd"
            act, flops = 2 * (M * K + M * N), 2 * M * N * K
            ref = F.linear(x, W)
            add(op, M, "ours (nf4_linear_forward)", lambda: mm.nf4_linear_forward(x, q), w_bytes + act, flops,
                mm.forward_path(M, q), ref)  # fmt: skip
            if M == 1 and dev.type == "cuda":  # bnb's CPU gemv_4bit wants its own packing: GPU only
                add(op, M, "bnb gemv_4bit", lambda: bnbF.gemv_4bit(x, packed, state=state), w_bytes + act, flops,
                    "gemv_4bit (+ its nested-absmax dequantize)", ref)  # fmt: skip
            add(op, M, "bnb matmul_4bit", lambda: bnb.matmul_4bit(x, packed.t(), state), w_bytes + act, flops,
                bnb_matmul_path(dev, M, N, K, dt), ref)  # fmt: skip
            add(op, M, "cuBLAS bf16", lambda: F.linear(x, W), 2 * N * K + act, flops, ref=ref)

        # routing: the fused GEMM against dequantize + cuBLAS, whatever DENSE_MIN_M says
        for M in crossover_ms:
            x = torch.randn(M, K, device=dev, dtype=dt)
            act, flops = 2 * (M * K + M * N), 2 * M * N * K
            ref = F.linear(x, W)
            add("routing", M, "ours fused GEMM", lambda: mm.nf4_gemm(x, q), w_bytes + act, flops, ref=ref)
            add("routing", M, "ours dequantize + cuBLAS", lambda: F.linear(x, triton_dequantize(q, dt)),
                w_bytes + act, flops, ref=ref)  # fmt: skip

    for M in train_ms[-1:]:  # backward: grad_x = grad_y · W
        gy = torch.randn(M, N, device=dev, dtype=dt)
        ref = gy @ W
        act, flops = 2 * (M * K + M * N), 2 * M * N * K
        add("train bwd (grad_x)", M, "ours (nf4_linear_backward)", lambda: mm.nf4_linear_backward(gy, q),
            w_bytes + act, flops, mm.backward_path(M, q), ref)  # fmt: skip
        bnb_bwd = lambda: gy @ bnbF.dequantize_4bit(packed, state).to(dt)  # noqa: E731  (MatMul4Bit.backward)
        add("train bwd (grad_x)", M, "bnb backward ops", bnb_bwd, w_bytes + act, flops, "dequantize_4bit + matmul",
            ref)  # fmt: skip
        add("train bwd (grad_x)", M, "cuBLAS bf16", lambda: gy @ W, 2 * N * K + act, flops, ref=ref)
    return rows


def crossovers(rows) -> dict:
    """Per shape: the smallest routing M from which dequantize + cuBLAS is at least as fast as the fused GEMM
    (None: the fused GEMM won at every M measured)."""
    out = {}
    for shape in dict.fromkeys(r["shape"] for r in rows if r["op"] == "routing"):
        times = {}
        for r in rows:
            if r["op"] == "routing" and r["shape"] == shape:
                times.setdefault(r["M"], {})[r["impl"]] = r["ms"]
        dense_wins = [M for M, t in sorted(times.items()) if t["ours dequantize + cuBLAS"] <= t["ours fused GEMM"]]
        out[shape] = dense_wins[0] if dense_wins else None
    return out


# --- CPU ----------------------------------------------------------------------------------------------------------


def bench_cpu(shapes, train_ms, decode_ms, min_run_time):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    dev = torch.device("cpu")
    dt = torch.bfloat16
    rows = []
    for model, layer, N, K in shapes:
        torch.manual_seed(0)
        w = (torch.randn(N, K) * 0.02).to(dt)
        q = quantize_nf4(w)
        packed, state = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        W = dequantize_nf4(q, dt)
        shape = f"{model} {layer} {N}x{K}"
        t = lambda fn: time_cpu_ms(fn, min_run_time)  # noqa: E731

        def add(op, M, impl, ms, nbytes, flops, path=""):
            rows.append(dict(op=op, shape=shape, N=N, K=K, M=M, impl=impl, ms=ms, bytes=nbytes, flops=flops, path=path))

        add("quantize", 0, "ours (PyTorch)", t(lambda: quantize_nf4(w)), 2 * N * K + q.nbytes, 0)
        bnb_quantize = lambda: bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)  # noqa: E731
        add("quantize", 0, "bnb quantize_4bit", t(bnb_quantize), 2 * N * K + q.nbytes, 0)
        dq_bytes = q.nbytes + 2 * N * K
        add("dequantize", 0, "ours (PyTorch)", t(lambda: dequantize_nf4(q, dt)), dq_bytes, 0)
        add("dequantize", 0, "bnb dequantize_4bit", t(lambda: bnbF.dequantize_4bit(packed, state)), dq_bytes, 0)
        for M in decode_ms + train_ms:
            x = torch.randn(M, K).to(dt)
            op = "decode" if M in decode_ms else "train fwd"
            act = 2 * (M * K + M * N)
            with torch.no_grad():
                ref = F.linear(x, W)
                ours = lambda: F.linear(x, dequantize_nf4(q, dt))  # noqa: E731  (NF4Linear, backend "torch")
                check_close(ours(), ref, "ours")
                check_close(bnb.matmul_4bit(x, packed.t(), state), ref, "bnb")
                add(op, M, "ours (dequantize + F.linear)", t(ours), q.nbytes + act, 2 * M * N * K)
                add(op, M, "bnb matmul_4bit", t(lambda: bnb.matmul_4bit(x, packed.t(), state)), q.nbytes + act,
                    2 * M * N * K, bnb_matmul_path(dev, M, N, K, dt))  # fmt: skip
                add(op, M, "dense bf16 F.linear", t(lambda: F.linear(x, W)), 2 * N * K + act, 2 * M * N * K)
    return rows


# --- report -------------------------------------------------------------------------------------------------------


def add_ratios(rows, bandwidth_gbps, sheet_gbps=None):
    """GB/s, TFLOP/s, % of bandwidth (measured copy; datasheet), and time ratios to the fastest bnb row and to the
    dense baseline of the same op, shape and M."""
    for r in rows:
        r["gbps"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
        r["tflops"] = r["flops"] / (r["ms"] * 1e-3) / 1e12 if r["flops"] else None
        r["pct_bw"] = 100 * r["gbps"] / bandwidth_gbps if bandwidth_gbps else None
        r["pct_sheet"] = 100 * r["gbps"] / sheet_gbps if sheet_gbps else None
        same = [s for s in rows if (s["op"], s["shape"], s["M"]) == (r["op"], r["shape"], r["M"])]
        bnb = [s["ms"] for s in same if s["impl"].startswith("bnb")]
        dense = [s["ms"] for s in same if s["impl"].startswith(("cuBLAS", "dense"))]
        r["bnb_over_this"] = min(bnb) / r["ms"] if bnb else None  # > 1: faster than bnb's fastest path
        r["dense_over_this"] = dense[0] / r["ms"] if dense else None  # > 1: faster than dense bf16


def to_markdown(rows, info, bandwidth_gbps, bandwidth_note, note="", crossover=None) -> str:
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    bandwidth = f"{bandwidth_gbps:.0f} GB/s" if bandwidth_gbps else "none"
    lines = [
        f"# NF4 kernel benchmark — {info.get('gpu') or info['cpu']} — {info['date']}",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()),
        "",
        *([note, ""] if note else []),
        f"Bandwidth reference: {bandwidth} ({bandwidth_note}). "
        "`x bnb` / `x dense` = their time / this time (> 1 means this row is faster; `x bnb` against bnb's fastest "
        "row). GB/s: the least bytes the operation must move (4-bit codes + scales + activations; 2 bytes/weight "
        "dense) over the time, also for implementations that move more (dequantize + matmul).",
        "",
    ]
    if crossover is not None:
        from minilora.kernels.nf4_matmul import DENSE_MIN_M

        lines += [
            f"Routing crossover (nf4_matmul.DENSE_MIN_M is {DENSE_MIN_M}): the smallest M from which dequantize + "
            "cuBLAS is at least as fast as the fused GEMM — "
            + "; ".join(f"{shape}: {m if m is not None else 'never (fused won at every M)'}"
                        for shape, m in crossover.items()),  # fmt: skip
            "",
        ]
    lines += [
        "| op | shape | M | implementation | time (ms) | GB/s | % BW | % sheet | TFLOP/s | x bnb | x dense | path |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['M'] or ''} | {r['impl']} | {r['ms']:.4f} | {r['gbps']:.1f} | "
            f"{fmt(r['pct_bw'], '.0f')} | {fmt(r.get('pct_sheet'), '.0f')} | {fmt(r['tflops'], '.2f')} | "
            f"{fmt(r['bnb_over_this'], '.2f')} | {fmt(r['dense_over_this'], '.2f')} | {r['path']} |"
        )
    return "\n".join(lines) + "\n"


def time_once_ms(fn) -> float:
    """One untimed-quality call (the --interpret smoke run): only checks that everything runs."""
    import time

    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--train-m", type=int, nargs="+", default=None, help="batch rows of the training matmuls")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing (a smoke run)")
    parser.add_argument("--interpret", action="store_true",
                        help="the GPU code path on CPU in the Triton interpreter (needs TRITON_INTERPRET=1), tiny "
                             "shapes, untimed: a smoke run")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (bnb's C code follows OMP_NUM_THREADS; set both for a fair CPU run)")
    parser.add_argument("--note", default="", help="a line added to the report (e.g. what else ran on the machine)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" or args.interpret else device
    crossover = None
    if args.interpret:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--interpret needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        # fp32: the interpreter's tl.dot is wrong on bf16 operands; shapes with several programs and K-iterations.
        shapes = [("tiny", "q", 136, 256)] + ([] if args.quick else [("tiny", "down", 72, 512)])
        rows = bench_gpu(shapes, args.train_m or [24], [1, 3], [16] if args.quick else [16, 32], device="cpu",
                         dt=torch.float32, time_ms=time_once_ms)  # fmt: skip
        crossover = crossovers(rows)
        bandwidth, sheet, note, tag = None, None, "Triton interpreter on CPU: untimed smoke run", "interpret"
    elif device == "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("unset TRITON_INTERPRET to benchmark real GPU kernels")
        shapes = GPU_SHAPES[:2] if args.quick else GPU_SHAPES
        crossover_ms = CROSSOVER_MS[::2] if args.quick else CROSSOVER_MS
        rows = bench_gpu(shapes, args.train_m or [512, 2048], DECODE_MS, crossover_ms)
        crossover = crossovers(rows)
        bandwidth = copy_bandwidth_gbps()
        name = torch.cuda.get_device_properties(0).name
        sheet = next((v for k, v in DATASHEET_GBPS.items() if all(w in name for w in k.split())), None)
        note = "measured device-to-device copy" + (f"; datasheet {sheet} GB/s" if sheet else "")
        tag = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    else:
        shapes = CPU_SHAPES[:2] if args.quick else CPU_SHAPES
        rows = bench_cpu(shapes, args.train_m or [64], [1], min_run_time=0.2 if args.quick else 1.0)
        # CPU reference bandwidth: a large tensor copy (read + write), same definition as on the GPU.
        src = torch.empty(2**28, dtype=torch.uint8)
        dst = torch.empty_like(src)
        bandwidth = 2 * src.numel() / (time_cpu_ms(lambda: dst.copy_(src), 1.0) * 1e-3) / 1e9
        sheet, note, tag = None, f"measured 256 MiB memcpy, {torch.get_num_threads()} threads", "cpu"
    info = harness.machine_info(device)
    add_ratios(rows, bandwidth, sheet)
    report = to_markdown(rows, info, bandwidth, note, args.note, crossover)
    print(report)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"nf4_{tag}_{info['date']}"
        stem.with_suffix(".md").write_text(report)
        payload = dict(machine=info, bandwidth_gbps=bandwidth, bandwidth_note=note, note=args.note,
                       crossover=crossover, rows=rows)  # fmt: skip
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
