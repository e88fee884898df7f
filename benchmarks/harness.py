"""What every benchmark here shares: the machine it ran on, interleaved timing, and writing the results.

Each benchmark is a script (`python benchmarks/NAME.py`); they import this module from the same folder.
"""

import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str, packages=("triton", "bitsandbytes")) -> dict:
    """Date, software versions, CPU and threads (and the GPU on CUDA): what a reader needs to judge a figure."""
    info = {"date": datetime.date.today().isoformat(), "device": device, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    for pkg in packages:
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, warmup: int, steps: int, device) -> dict:
    """Per call of each function, called in turn (order reversed every round), warm-up calls dropped:
    {name: {"wall": [s, ...], "cpu": [s, ...]}}.

    Interleaving puts the sides being compared under the same machine load, so their ratio is fair on a shared,
    noisy machine even when the absolute times are not. "cpu" is this process's CPU time (all its threads).
    Single-threaded it is the compute the call needed, whatever other processes took from the machine meanwhile:
    on a loaded shared CPU a steadier measure than wall time, though still not immune to what they do to the
    caches. On GPU, wall time is the measure.
    """
    times = {name: {"wall": [], "cpu": []} for name in fns}
    order = list(fns)
    for i in range(warmup + steps):
        for name in order if i % 2 == 0 else order[::-1]:
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            synchronize(device)
            if i >= warmup:
                times[name]["wall"].append(time.perf_counter() - t0)
                times[name]["cpu"].append(time.process_time() - c0)
    return times


def save_results(stem: Path, report: str, data) -> Path:
    """Write STEM.md (the report a person reads) and STEM.json (every number, for re-analysis)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(report, encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return stem.with_suffix(".md")
