"""What this CPU's float32 GEMM limit really is: torch's two CPU libraries side by side on the training shapes.

Why: the training benchmark (bench_train_vs_peft.py) reports each step's useful GFLOP/s as a share of a
"large-GEMM peak", and issue 12 sets a target on that share. Until now the peak was one library's rate: torch.mm,
which on the CPU calls MKL. On an AMD CPU MKL does not take its fastest code paths, while oneDNN (also inside torch,
`torch.ops.mkldnn`) has JIT kernels for every x86 CPU; minilora.packed_weights already uses it for generation.
If oneDNN with a weight reordered once into its blocked layout is much faster on the same products, then the
machine's limit is that rate, and a step's share of MKL's rate says how well it uses MKL, not the hardware.

Measured: per shape (M rows, K in, N out: the block linears' forward of the benchmark shape and of SmolLM2-135M,
M = B·T = 1024, and a 2048³ square), F.linear (MKL) against mkldnn._linear_pointwise on the packed weight and on
the plain weight (minilora.cpu_matmul.linear, what training runs: no copy of the weight), and backward's grad_x
= g W, (M, N) @ (N, K), through torch.mm (MKL) against cpu_matmul.linear(g, W.T) (oneDNN on the transposed view);
interleaved, single-threaded CPU time, median and spread over --repeats, plus the largest |difference| of the
MKL and packed results (the same float32 products summed in another order).

    python benchmarks/gemm_libraries.py                  # --threads 1 by default
    python benchmarks/gemm_libraries.py --repeats 9 --no-save
"""

import argparse
import statistics
from datetime import date

import torch
import torch.nn.functional as F
from harness import RESULTS, machine_info, save_results, time_interleaved

from minilora import cpu_matmul
from minilora.packed_weights import onednn_available, pack, packed_linear

SHAPES = {  # name: (M, K, N)
    "square 2048": (2048, 2048, 2048),
    "benchmark q/o (512 -> 512)": (1024, 512, 512),
    "benchmark gate/up (512 -> 1408)": (1024, 512, 1408),
    "benchmark down (1408 -> 512)": (1024, 1408, 512),
    "SmolLM2 q/o (576 -> 576)": (1024, 576, 576),
    "SmolLM2 k/v (576 -> 192)": (1024, 576, 192),
    "SmolLM2 gate/up (576 -> 1536)": (1024, 576, 1536),
    "SmolLM2 down (1536 -> 576)": (1024, 1536, 576),
}


@torch.no_grad()  # packed_linear multiplies through oneDNN only when no gradient is wanted
def measure(M: int, K: int, N: int, repeats: int) -> dict:
    x, w, g = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
    packed = pack(w)  # once, as a frozen weight would be
    fns = {"mkl": lambda: F.linear(x, w), "onednn": lambda: packed_linear(x, packed, w),
           "onednn_plain": lambda: cpu_matmul.linear(x, w),
           "mkl_grad_x": lambda: torch.mm(g, w), "onednn_grad_x": lambda: cpu_matmul.linear(g, w.T)}
    diff = (fns["mkl"]() - fns["onednn"]()).abs().max().item()
    times = time_interleaved(fns, warmup=2, steps=repeats, device=torch.device("cpu"))
    flops = 2 * M * K * N
    rate = {name: statistics.median(flops / 1e9 / t for t in times[name]["cpu"]) for name in fns}
    ratios = [m / o for m, o in zip(times["mkl"]["cpu"], times["onednn"]["cpu"])]
    return {"M": M, "K": K, "N": N, "mkl_gflops": rate["mkl"], "onednn_gflops": rate["onednn"],
            "onednn_plain_gflops": rate["onednn_plain"], "mkl_grad_x_gflops": rate["mkl_grad_x"],
            "onednn_grad_x_gflops": rate["onednn_grad_x"], "speedup": statistics.median(ratios),
            "speedup_range": [min(ratios), max(ratios)], "max_abs_diff": diff,
            "max_abs_value": fns["mkl"]().abs().max().item()}


def markdown(info: dict, rows: dict, note: str) -> str:
    lines = [f"# float32 GEMM: MKL (torch.mm / F.linear) vs oneDNN packed — {info['cpu']} — {info['date']}", "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""]
    if note:
        lines += [f"Note: {note}", ""]
    lines += ["`speed-up` = MKL's CPU time / oneDNN's, per interleaved round: median (min–max). `diff`: largest "
              "|MKL − oneDNN| over the output, beside the output's largest |value|.", "",
              "GFLOP/s columns: forward x Wᵀ through MKL, oneDNN on the packed weight, oneDNN on the plain weight "
              "(cpu_matmul.linear, training's product); then grad_x = g W through MKL and through oneDNN on Wᵀ.", "",
              "| shape | M | K | N | MKL | oneDNN packed | oneDNN plain | speed-up (packed) | grad_x MKL | "
              "grad_x oneDNN | diff (of max |y|) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['M']} | {r['K']} | {r['N']} | {r['mkl_gflops']:.1f} | {r['onednn_gflops']:.1f} | "
                     f"{r['onednn_plain_gflops']:.1f} | "
                     f"{r['speedup']:.2f} ({r['speedup_range'][0]:.2f}–{r['speedup_range'][1]:.2f}) | "
                     f"{r['mkl_grad_x_gflops']:.1f} | {r['onednn_grad_x_gflops']:.1f} | "
                     f"{r['max_abs_diff']:.1e} ({r['max_abs_value']:.0f}) |")
    best = max(r["onednn_gflops"] for r in rows.values())
    mkl = rows["square 2048"]["mkl_gflops"]
    lines += ["", f"The fastest float32 GEMM rate measured here is {best:.1f} GFLOP/s (oneDNN, packed weight); "
              f"torch.mm's 2048³ rate, the 'large-GEMM peak' the training benchmark used until 2026-12-02, is "
              f"{mkl:.1f} ({mkl / best:.0%} of it). A train step's share of MKL's peak is therefore a share of what "
              f"MKL does on this CPU, not of the hardware's limit.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--tag", default="", help="a suffix for the result files' names (a second run of the day)")
    args = p.parse_args()
    if not onednn_available():
        raise SystemExit("this torch build has no oneDNN linear (torch.ops.mkldnn._reorder_linear_weight)")
    torch.set_num_threads(args.threads)
    info = machine_info("cpu", packages=())
    rows = {}
    for name, (M, K, N) in SHAPES.items():
        rows[name] = measure(M, K, N, args.repeats)
        r = rows[name]
        print(f"{name}: MKL {r['mkl_gflops']:.1f}, oneDNN packed {r['onednn_gflops']:.1f}, plain "
              f"{r['onednn_plain_gflops']:.1f} GFLOP/s; grad_x MKL {r['mkl_grad_x_gflops']:.1f}, oneDNN "
              f"{r['onednn_grad_x_gflops']:.1f}", flush=True)
    report = markdown(info, rows, args.note)
    print(report)
    if not args.no_save:
        tag = f"_{args.tag}" if args.tag else ""
        path = save_results(RESULTS / f"gemm_libraries_cpu_{date.today()}{tag}", report,
                            {"machine": info, "rows": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
