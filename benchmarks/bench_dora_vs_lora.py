"""DoRA against LoRA (and QDoRA against QLoRA) on the same model, data and settings: validation loss after a short
run, time per training step, and peak memory.

    python benchmarks/bench_dora_vs_lora.py                 # the shipped tiny model, the base demonstration's data
    python benchmarks/bench_dora_vs_lora.py --model DIR --data corpus.txt --steps 100

Each method trains in a fresh subprocess (`python -m minilora.train`), so its peak resident memory (ru_maxrss) is
its own; the order of the methods alternates between repeats so that a slow patch of a shared machine falls on all
of them alike. Reported per method: the final validation loss (identical across repeats: the runs are seeded),
the median training tokens per second over the repeats (with min-max), and the median peak RSS.

What to expect: DoRA computes ‖W0 + s·BA‖ for every adapted layer on every forward (a (d_out, d_in) product and
norm), so it is slower than LoRA per step; on a 4-bit base it also dequantizes each weight once more for the norm.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

METHODS = ("lora", "dora", "qlora", "qdora")


def run_once(method: str, args, out: Path) -> dict:
    """One training run in a child process; its metrics and peak memory."""
    flags = ["--method", method, "--max-steps", str(args.steps), "--output", str(out)]
    if args.model:
        flags += ["--model", args.model, "--data", args.data]
    code = ("import resource, sys, time, json; from minilora.train import main; t = time.perf_counter(); "
            f"main({flags!r}); "
            "print('BENCH', json.dumps({'wall_s': time.perf_counter() - t, "
            "'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method} run failed:\n{done.stderr[-2000:]}")
    bench = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("BENCH "))[6:])
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {"val_loss": records[-1]["val_loss"], "first_val_loss": records[0]["val_loss"],
            "wall_s": bench["wall_s"], "tokens_per_s": steps[-1]["tokens_per_s"],
            "peak_rss_mb": bench["maxrss_kb"] / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: the shipped tiny model and demo data)")
    parser.add_argument("--data", help="training text with --model")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--note", default="", help="a line for the report (e.g. what else ran on the machine)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    runs = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = args.methods if rep % 2 == 0 else args.methods[::-1]
            for m in order:
                runs[m].append(run_once(m, args, Path(tmp) / f"{m}-{rep}"))
                print(f"repeat {rep + 1}/{args.repeats} {m}: {runs[m][-1]}", flush=True)
    info = harness.machine_info("cpu", packages=())
    rows = []
    for m, rs in runs.items():
        tok = [r["tokens_per_s"] for r in rs]
        rows.append({"method": m, "val_loss_start": rs[0]["first_val_loss"], "val_loss_end": rs[0]["val_loss"],
                     "tokens_per_s_median": statistics.median(tok), "tokens_per_s_min": min(tok),
                     "tokens_per_s_max": max(tok), "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)})
    by = {r["method"]: r for r in rows}
    lines = [f"# DoRA vs LoRA, {info['date']}", "",
             f"Model: {args.model or 'the shipped tiny model (default demo data)'}; {args.steps} steps; "
             f"{args.repeats} repeats, order alternating; CPU: {info['cpu']} ({info['logical_cpus']} logical), "
             f"torch {info['torch']}; load average at start "
             f"{info['load_avg_start']}.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| method | val loss start → end | tokens/s median (min–max) | speed vs its LoRA | peak RSS MB |",
              "|---|---|---|---|---|"]
    for r in rows:
        ref = by.get({"dora": "lora", "qdora": "qlora"}.get(r["method"], r["method"]))
        speed = f"{r['tokens_per_s_median'] / ref['tokens_per_s_median']:.2f}x" if ref else "-"
        lines.append(f"| {r['method']} | {r['val_loss_start']:.4f} → {r['val_loss_end']:.4f} | "
                     f"{r['tokens_per_s_median']:,.0f} ({r['tokens_per_s_min']:,.0f}–{r['tokens_per_s_max']:,.0f}) | "
                     f"{speed} | {r['peak_rss_mb']:,.0f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    path = harness.save_results(args.out / f"dora_vs_lora_cpu_{info['date']}", report,
                                {"info": info, "args": vars(args) | {"out": str(args.out)}, "runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
