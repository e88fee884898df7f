"""Training throughput with 1 and 2 processes (torchrun, gloo on CPU / nccl on GPU), and the 4-bit base per rank.

    python benchmarks/bench_distributed.py                 # CPU: 1 process (1 and 2 threads) vs 2 processes
    python benchmarks/bench_distributed.py --quick         # fewer rounds, a smoke run
    python benchmarks/bench_distributed.py --device cuda   # 1 GPU vs 2 GPUs (needs 2)

Every side trains the same run on the same global batch (`--batch-size 8` for one process, `--batch-size 4` for
each of two), a small Llama built by transformers (hidden 256, 4 blocks), LoRA r 8 on every linear, base mode on
128-token blocks. Each side is a fresh `python -m minilora.train` / `torchrun` launch; the sides are interleaved
round by round (order reversed every round, harness.time_interleaved) so they share the machine's load. Reported:
the trainer's own tokens/s (metrics.jsonl: tokens of the steps over the time of the steps, no start-up), the launch
wall time (start-up included), medians and spreads, and the ratio to one process with one thread.

Memory: one QLoRA launch under FSDP2 prints the bytes of 4-bit codes and block scales each rank holds
(distributed.wrap_model); its figures are copied into the report.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from harness import RESULTS, machine_info, save_results, time_interleaved  # noqa: E402

TEXT = ("The river runs past the old mill and the children count the boats. In spring the orchard turns white, "
        "and bees visit every tree; in autumn the apples fall and the mill grinds late into the night.\n\n") * 80


def make_model(root: Path) -> Path:
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint("llama", root / "model", tokenizer="llama3", hidden_size=256,
                                intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=4, max_position_embeddings=512)


def launch(root: Path, model: Path, data: Path, nproc: int, threads: int, device: str, steps: int,
           extra: list[str] = ()) -> tuple[float, str]:
    """One training launch; returns (tokens/s from metrics.jsonl, stdout)."""
    out = Path(tempfile.mkdtemp(dir=root))
    per_rank = 8 // nproc
    args = ["--model", str(model), "--data", str(data), "--block-size", "128", "--batch-size", str(per_rank),
            "--lora-r", "8", "--max-steps", str(steps), "--eval-every", "0", "--eval-batches", "1",
            "--warmup-steps", "1", "--output", str(out), "--device", device, "--dropout", "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None) if device == "cuda" else None
    if nproc == 1:
        command = [sys.executable, "-m", "minilora.train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "minilora.train", *args]
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} failed:\n{run.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records if "tokens_per_s" in r][-1], run.stdout


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--note", default="")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    rounds, steps = (1, 3) if args.quick else (args.rounds, args.steps)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root)
        data = root / "data.txt"
        data.write_text(TEXT, encoding="utf-8")
        if args.device == "cpu":
            sides = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2),
                     "2 processes, 1 thread each": (2, 1)}
        else:
            sides = {"1 GPU": (1, 4), "2 GPUs (DDP)": (2, 4)}
        tokens = {name: [] for name in sides}

        def side(name):
            nproc, threads = sides[name]
            tokens[name].append(launch(root, model, data, nproc, threads, args.device, steps)[0])

        info = machine_info(args.device, packages=())
        times = time_interleaved({name: (lambda n=name: side(n)) for name in sides}, warmup=0, steps=rounds,
                                 device="cpu")
        _, stdout = launch(root, model, data, 2, 1, args.device, 1, ["--method", "qlora", "--fsdp", "true",
                                                                     "--quant-backend", "torch"])
        memory_line = re.search(r"^4-bit base .*$", stdout, re.M)[0]
        info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]

    base = statistics.median(tokens[next(iter(sides))])
    lines = [f"# Distributed training throughput ({args.device}, {info['date']})", "",
             f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}; load average "
             f"{info['load_avg_start']} at the start, {info['load_avg_end']} at the end.",
             "The machine was shared with other jobs while this ran: absolute figures are low and noisy; only the "
             "interleaved ratios are comparable." if args.device == "cpu" else "",
             args.note, "",
             f"Same run on every side: LoRA r 8 on a Llama of hidden 256 x 4 blocks, global batch 8 x 128 tokens, "
             f"{steps} steps; {rounds} interleaved rounds.", "",
             "| side | tokens/s (trainer), median (min-max) | x 1 process, 1 thread | launch wall s, median |",
             "|---|---|---|---|"]
    for name in sides:
        lines.append(f"| {name} | {spread(tokens[name])} | {statistics.median(tokens[name]) / base:.2f} | "
                     f"{statistics.median(times[name]['wall']):.1f} |")
    lines += ["", "QLoRA under FSDP2, 2 processes (printed by the trainer):", "", f"    {memory_line}", ""]
    report = "\n".join(lines)
    print(report)
    if not args.no_save:
        path = save_results(RESULTS / f"distributed_{args.device}_{info['date']}", report,
                            {"machine": info, "tokens_per_s": tokens,
                             "launch_wall_s": {k: v["wall"] for k, v in times.items()},
                             "memory_line": memory_line, "steps": steps, "rounds": rounds})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
