"""Shared test setup.

TRITON_INTERPRET must be set before triton (or anything importing it) is imported, so that the Triton kernels
run on CPU tensors in the interpreter when no GPU is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib

import pytest

# ../shared next to the checkout; from a git worktree (e.g. /work/wt/NAME) the nearest parent that has one
SHARED = next(
    (p / "shared" for p in pathlib.Path(__file__).resolve().parents[1:] if (p / "shared" / "fixtures").is_dir()),
    pathlib.Path(__file__).resolve().parents[2] / "shared",
)
FIXTURES = SHARED / "fixtures"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
