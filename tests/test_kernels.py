"""The Triton NF4 kernels (minilora/kernels/) against their PyTorch references.

Without a GPU they run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py) on CPU tensors; with
one, the same tests run on CUDA (marked gpu). Interpreter limits that shape these tests:
- tl.dot on bf16 operands returns garbage there, so GEMM/backward are tested with fp16/fp32 activations on CPU
  and with bf16 only on a GPU; the GEMV kernel (no tl.dot) is tested with bf16 everywhere.
- The interpreter casts fp32 → bf16 by truncation (a GPU rounds to nearest even), so bf16 results may differ by
  one bf16 ulp on CPU; on a GPU the dequantize kernel is bit-identical in every dtype.
- Programs run one at a time: the GEMV's split-K atomics are exercised for their arithmetic, never for races.

Tolerance of the matmuls, derived rather than tuned: with u the unit roundoff of the activation dtype
(2^-24, 2^-11, 2^-8), each dequantized weight is rounded once to that dtype (≤ 2u relative, truncation included),
the fp32 sums of K products err by ≤ K·2^-24, and the output is rounded once (≤ 2u). So
|y - x·W32ᵀ| ≤ (4u + K·2^-24) · (|x|·|W32|ᵀ), elementwise, where W32 is the fp32 dequantized weight.
The GEMV rounds differently and gets a bound of its own: it never rounds W (exact fp32 code values times x, summed
per 64-block in fp32, times the block's scale: K + 2 fp32 roundings deep, in another order than the reference's
fp32 matmul, itself K + 1 deep), then rounds y once: |y - x·W32ᵀ| ≤ (2u + (2K + 3)·2^-24) · (|x|·|W32|ᵀ).
A wrong nibble, scale or column is off by ~|x||w| and fails these bounds by orders of magnitude.
"""

import os
from pathlib import Path

import pytest
import torch

from minilora.kernels import nf4_matmul as mm
from minilora.kernels.nf4_dequant import nf4_dequantize, reference_dequantize
from minilora.quant.nf4 import dequantize_nf4, quantize_nf4

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _weight(N, K, blocksize=64, double_quant=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (0.1 + torch.rand(N, 1, generator=g))  # rows of different magnitude
    return quantize_nf4(w.to(dtype), blocksize=blocksize, double_quant=double_quant).to(device)


def _x(*shape, dtype, device, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def _dot_dtypes(device):
    """Activation dtypes for kernels that use tl.dot: bf16 only where tl.dot is real (a GPU)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def assert_matmul_close(y, x, W32, gemv=False):
    """Check y ≈ x · W32ᵀ with the bound derived in the module docstring (the GEMV's own bound too if gemv)."""
    x32, y32 = x.float(), y.float()
    exact = x32 @ W32.t()
    magnitude = x32.abs() @ W32.abs().t()
    u, K = UNIT_ROUNDOFF[x.dtype], x.shape[-1]
    err = (y32 - exact).abs()
    for tol in [(4 * u + K * 2.0**-24) * magnitude + 1e-30] + ([(2 * u + (2 * K + 3) * 2.0**-24) * magnitude
                                                                 + 1e-30] if gemv else []):  # fmt: skip
        assert (err <= tol).all(), f"max error {err.max():.3e}, worst ratio to bound {(err / tol).max():.2f}"


# --- dequantize ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 129), (64, 64), (300, 257), (2, 3, 40)])
def test_dequantize_kernel_equals_reference(shape, double_quant, device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    for in_dtype in (torch.float32, torch.bfloat16):
        q = quantize_nf4(w.to(in_dtype), double_quant=double_quant).to(device)
        assert torch.equal(reference_dequantize(q), dequantize_nf4(q))  # the two references agree exactly
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            out, ref = nf4_dequantize(q, out_dtype), dequantize_nf4(q, out_dtype)
            assert out.shape == ref.shape and out.dtype == out_dtype
            if out_dtype == torch.bfloat16 and INTERPRET:  # truncating cast in the interpreter: ≤ 1 ulp
                ulps = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
                assert ulps.max() <= 1
            else:
                assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_dequantize_kernel_other_blocksizes(blocksize, device):
    q = _weight(37, 300, blocksize=blocksize, device=device)
    assert torch.equal(nf4_dequantize(q, torch.float32), dequantize_nf4(q, torch.float32))


# --- forward: GEMV (M <= 4) and GEMM -------------------------------------------------------------------------------

# (M, N, K): odd N → clamped rows; M = 3 → a padded row of x; N = 300 → three programs of 128 rows, 8 K-steps
GEMV_SHAPES = [(1, 1, 64), (1, 33, 192), (3, 70, 128), (4, 17, 256), (2, 300, 512)]
GEMM_SHAPES = [(5, 7, 64), (17, 33, 128), (40, 100, 192)]  # odd M and N: partial tiles on both edges


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("M,N,K", GEMV_SHAPES)
def test_gemv_kernel(M, N, K, double_quant, device):
    q = _weight(N, K, double_quant=double_quant, device=device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # no tl.dot here: bf16 is fine in the interpreter
        x = _x(M, K, dtype=dtype, device=device)
        y = mm.nf4_gemv(x, q)
        assert y.shape == (M, N) and y.dtype == dtype
        assert_matmul_close(y, x, dequantize_nf4(q, torch.float32), gemv=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split_k", [2, 3])
def test_gemv_split_k(split_k, device):
    q = _weight(20, 320, device=device)  # 5 chunks of 64 → slices of 3 + 2 or 2 + 2 + 1 chunks
    x = _x(2, 320, dtype=torch.float32, device=device)
    assert_matmul_close(mm.nf4_gemv(x, q, split_k=split_k), x, dequantize_nf4(q, torch.float32), gemv=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_reads_misaligned_and_strided_rows(dtype, device):
    # A 16-bit x is read as int32 pairs: a view starting on an odd element, or rows of odd stride, must be copied
    # to an aligned buffer first (on a GPU a misaligned int32 load faults or reads the wrong pairs).
    q = _weight(40, 128, device=device)
    W32 = dequantize_nf4(q, torch.float32)
    base = _x(3, 131, dtype=dtype, device=device)
    for x in (base[:, 1:129], base.view(-1)[1 : 1 + 2 * 128].view(2, 128)):  # odd stride 131; offset 1 element
        assert x.data_ptr() % 4 or x.stride(0) % 2
        assert_matmul_close(mm.nf4_gemv(x, q), x, W32, gemv=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_gemm_kernel(M, N, K, double_quant, device):
    q = _weight(N, K, double_quant=double_quant, device=device)
    for dtype in _dot_dtypes(device):
        x = _x(M, K, dtype=dtype, device=device)
        y = mm.nf4_gemm(x, q)
        assert y.shape == (M, N) and y.dtype == dtype
        assert_matmul_close(y, x, dequantize_nf4(q, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_matmul_kernels_other_blocksizes(blocksize, device):
    # K = 192 with blocksize 128 or 256: quant blocks straddle rows; each 64-chunk must still find its own scale.
    q = _weight(21, 192, blocksize=blocksize, device=device)
    W32 = dequantize_nf4(q, torch.float32)
    for M in (1, 9):
        x = _x(M, 192, dtype=torch.float32, device=device)
        assert_matmul_close(mm.nf4_linear_forward(x, q), x, W32)
        gy = _x(M, 21, dtype=torch.float32, device=device)
        assert_matmul_close(mm.nf4_grad_input(gy, q), gy, W32.t())


# --- backward: grad_x = grad_y · W ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("M,N,K", [(1, 33, 64), (17, 70, 128), (40, 9, 192)])
def test_grad_input_kernel(M, N, K, double_quant, device):
    q = _weight(N, K, double_quant=double_quant, device=device)
    for dtype in _dot_dtypes(device):
        gy = _x(M, N, dtype=dtype, device=device)
        gx = mm.nf4_grad_input(gy, q)
        assert gx.shape == (M, K) and gx.dtype == dtype
        assert_matmul_close(gx, gy, dequantize_nf4(q, torch.float32).t())  # grad_y · W = grad_y · (Wᵀ)ᵀ


# --- the autograd function and the dispatch ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [1, 6])  # GEMV and GEMM forward
def test_nf4_matmul_autograd_matches_reference(M, device):
    q = _weight(24, 128, device=device)
    bias = _x(24, dtype=torch.float32, device=device, seed=3)
    x = _x(2, M, 128, dtype=torch.float32, device=device).requires_grad_()  # (B, T, K)
    x_ref = x.detach().clone().requires_grad_()
    y = mm.nf4_matmul(x, q, bias)
    y_ref = mm.reference_nf4_matmul(x_ref, q, bias)
    assert y.shape == (2, M, 24)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = _x(2, M, 24, dtype=torch.float32, device=device, seed=4)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    q = _weight(16, 64, device=device)
    x = _x(64, 7, dtype=torch.float16, device=device).t()  # (7, 64) with stride (1, 7)
    assert_matmul_close(mm.nf4_linear_forward(x, q), x, dequantize_nf4(q, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K", [(1, 9, 65), (6, 10, 129), (3, 4, 1)])
def test_unaligned_k_falls_back_to_dequantize(M, N, K, device):
    q = _weight(N, K, device=device)
    x = _x(M, K, dtype=torch.float16, device=device).requires_grad_()
    y = mm.nf4_matmul(x, q)
    assert_matmul_close(y, x, dequantize_nf4(q, torch.float32))
    gy = _x(M, N, dtype=torch.float16, device=device)
    y.backward(gy)
    assert_matmul_close(x.grad, gy, dequantize_nf4(q, torch.float32).t())


@pytest.mark.parametrize("device", DEVICES)
def test_large_m_routes_to_dequantize_and_matmul(device, monkeypatch):
    # From DENSE_MIN_M rows on, forward and backward dequantize once and call torch's matmul (cuBLAS on a GPU);
    # below it, the fused kernels run and the dense weight is never built. DENSE_MIN_M is lowered to 8 here so the
    # interpreter stays fast; the routing rule is the same.
    monkeypatch.setattr(mm, "DENSE_MIN_M", 8)
    calls = []
    real_dequantize = mm.triton_dequantize
    monkeypatch.setattr(mm, "triton_dequantize", lambda q, dtype: calls.append(dtype) or real_dequantize(q, dtype))
    q = _weight(24, 128, device=device)
    W32 = dequantize_nf4(q, torch.float32)
    assert [mm.forward_path(M, q) for M in (1, 4, 5, 7, 8, 100)] == ["gemv"] * 2 + ["gemm"] * 2 + [
        "dequantize + cuBLAS"] * 2  # fmt: skip
    assert [mm.backward_path(M, q) for M in (1, 7, 8)] == ["grad", "grad", "dequantize + cuBLAS"]
    for M, expected_calls in ((7, 0), (8, 2)):  # forward + backward
        calls.clear()
        x = _x(M, 128, dtype=torch.float16, device=device).requires_grad_()
        y = mm.nf4_matmul(x, q)
        gy = _x(M, 24, dtype=torch.float16, device=device, seed=5)
        y.backward(gy)
        assert len(calls) == expected_calls and all(d == torch.float16 for d in calls)
        assert_matmul_close(y, x, W32)
        assert_matmul_close(x.grad, gy, W32.t())


@pytest.mark.parametrize("device", DEVICES)
def test_fused_paths_never_materialise_the_weight(device, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the dense weight was materialised")

    monkeypatch.setattr(mm, "triton_dequantize", forbidden)
    q = _weight(12, 128, device=device)
    for M in (1, 20):
        x = _x(M, 128, dtype=torch.float32, device=device).requires_grad_()
        mm.nf4_matmul(x, q).sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_bad_shapes(device):
    q = _weight(8, 64, device=device)
    assert mm.nf4_matmul(_x(0, 64, dtype=torch.float32, device=device), q).shape == (0, 8)
    with pytest.raises(ValueError, match="last dimension 32"):
        mm.nf4_matmul(_x(2, 32, dtype=torch.float32, device=device), q)
    with pytest.raises(ValueError, match="dtype"):
        mm.nf4_matmul(torch.zeros(2, 64, dtype=torch.float64, device=device), q)


@pytest.mark.gpu
def test_llama_sized_shapes_on_gpu():
    # Real layer shapes (Llama-3.2-1B q_proj and MLP): too slow for the interpreter, cheap on a GPU.
    for N, K in [(2048, 2048), (8192, 2048), (2048, 8192)]:
        q = _weight(N, K, dtype=torch.bfloat16, device="cuda")
        W32 = dequantize_nf4(q, torch.float32)
        for M in (1, 3, 512):
            x = _x(M, K, dtype=torch.bfloat16, device="cuda")
            assert_matmul_close(mm.nf4_linear_forward(x, q), x, W32)
        gy = _x(512, N, dtype=torch.bfloat16, device="cuda")
        assert_matmul_close(mm.nf4_linear_backward(gy, q), gy, W32.t())


# --- the GPU build, checked without a GPU ----------------------------------------------------------------------------

# Shared memory a program may use (the opt-in maximum per block), by compute capability: T4 / RTX 20xx (no bf16),
# RTX 30xx-40xx / A10 / L4 (8.6 and 8.9 alike), H100 / H200. An A100 (8.0) allows 163 KB, more than any config needs.
SHARED_MEMORY_LIMIT = {75: 65536, 89: 101376, 90: 232448}
COMPUTE_DTYPES = {75: ("fp16", "fp32"), 89: ("bf16", "fp32"), 90: ("bf16", "fp32")}
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Runs in a child process without TRITON_INTERPRET, with the launchers' settings as benchmarks/kernel_sass_proxy.py
# reads them (kernel_specs), so this test and the proxy compile the same kernels.
_COMPILE_FOR_GPUS = """
import json
import sys

sys.path.insert(0, sys.argv[1])
import kernel_sass_proxy as proxy

limits, dtypes = (json.loads(arg) for arg in sys.argv[2:])
# Every kernel for an H100 in bf16, and the GEMV / dequantize in the dtypes that take other code paths.
for dtype in ("bf16", "fp16", "fp32"):
    for spec in proxy.kernel_specs(dtype, 90):
        if dtype == "bf16" or spec["name"] in ("gemv M=1", "dequantize"):
            proxy.compile_spec(spec, dtype, 90)
# The tiled kernels on the other GPU generations: for the backward, the deepest pipeline (as _launch tries them)
# that fits; for the autotuned GEMM, the configuration with the smallest tiles (the autotuner skips the ones
# that do not fit, so it must keep at least this one).
gemms = [spec for spec in proxy.kernel_specs("bf16", 90) if spec["name"].startswith("gemm")]
print(json.dumps({"gemm_configs": len(gemms)}))
smallest = min(gemms, key=lambda s: s["flops"] * s["options"]["num_stages"])["name"]
for cc, limit in limits.items():
    for dtype in dtypes[cc]:
        for spec in proxy.kernel_specs(dtype, int(cc)):
            if spec["name"] == "grad_input":
                for stages in range(spec["options"]["num_stages"], 0, -1):
                    shared = proxy.compile_spec(spec, dtype, int(cc), num_stages=stages).metadata.shared
                    if shared <= limit:
                        break
            elif spec["name"] == smallest or (int(cc) == 90 and spec["name"].startswith("gemm")):
                stages = spec["options"]["num_stages"]
                shared = proxy.compile_spec(spec, dtype, int(cc)).metadata.shared
            else:
                continue
            print(json.dumps({"cc": int(cc), "dtype": dtype, "kernel": spec["name"], "stages": stages,
                              "shared": shared}))
print("ok")
"""


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the other tests compile and run the kernels for real")
def test_kernels_compile_for_t4_l4_h100_without_a_gpu():
    # The interpreter never lowers a kernel to PTX, so a GPU-only compile error (a bf16 dot, a layout, shared memory
    # over the limit) would pass the CPU tests. Triton can compile for a target without a driver: build cubins with
    # the GPU tile sizes, in a child process without TRITON_INTERPRET, for sm_90 (every kernel) and for three GPU
    # generations (the tiled GEMM and grad kernels, whose shared memory grows with the pipeline depth).
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _COMPILE_FOR_GPUS, str(BENCHMARKS), json.dumps(SHARED_MEMORY_LIMIT),
           json.dumps(COMPUTE_DTYPES)]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = result.stdout.split()
    assert result.returncode == 0 and lines[-1] == "ok", result.stderr[-4000:]
    n_gemm, *fits = [json.loads(line) for line in result.stdout.splitlines()[:-1]]
    n_gemm = n_gemm["gemm_configs"]
    assert n_gemm > 1  # on a GPU the GEMM is autotuned (one config only under the interpreter)
    assert len(fits) == 2 * (n_gemm + 1) + 2 * 2 * 2  # sm_90: every GEMM config and the grad; others: 2 kernels
    for fit in fits:  # the grad kernel: some depth fits every GPU, so _launch's fallback ends in a kernel that loads
        assert fit["shared"] <= SHARED_MEMORY_LIMIT[fit["cc"]], fit  # the GEMM: the autotuner keeps a config
    # The tuned configurations need no fallback on an H100.
    assert all(f["stages"] >= 3 for f in fits if f["cc"] == 90), fits


@pytest.mark.skipif(not INTERPRET, reason="checks the offline compile path, used where there is no GPU")
def test_sass_proxy_script_runs_offline(tmp_path):
    # benchmarks/kernel_sass_proxy.py compiles the kernels for a GPU without one and reads the SASS. Run it as a
    # user would on two kernels, and check what the redesign promised is in the machine code: 16-byte loads of
    # the codes (GEMV) and 16-byte loads and stores (dequantize), a main loop found, shared-memory lookups instead
    # of global gathers of the code table, no spills.
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCHMARKS / "kernel_sass_proxy.py"), "--cc", "90", "--only", "dequantize",
           "gemv M=1", "--json", str(out)]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| gemv M=1 | 90 |" in result.stdout and "| dequantize | 90 |" in result.stdout
    rows = {r["kernel"]: r for r in json.loads(out.read_text())}
    gemv, dequant = rows["gemv M=1"], rows["dequantize"]
    assert gemv["loop"] and gemv["loop_instrs"] > 0 and not dequant["loop"]  # dequantize: one block per program
    for r in (gemv, dequant):
        assert r["local"] == 0 and r["spill_instrs"] == 0, r
        shared_loads = sum(v for k, v in r["counts"].items() if k.startswith("LDS."))  # the code-table lookups
        assert r["counts"].get("LDG.128", 0) >= 1 and shared_loads >= 1, r["counts"]
    assert dequant["counts"].get("STG.128", 0) >= 1 and not any(k.startswith("STG.16") for k in dequant["counts"])
    # The GEMV's global loads per iteration: codes, x, scales — a few, not one (or two) per weight as before.
    global_loads = sum(v for k, v in gemv["counts"].items() if k.startswith("LDG"))
    weights_per_thread = gemv["loop_instrs"] / gemv["instr_per_weight"]
    assert global_loads < weights_per_thread / 4, gemv["counts"]


@pytest.mark.skipif(not INTERPRET, reason="the interpreter smoke run; on a GPU gpu_checks.sh runs the real one")
def test_bench_nf4_kernels_gpu_path_runs_in_the_interpreter(tmp_path):
    # benchmarks/bench_nf4_kernels.py --interpret runs the GPU benchmark's code (every implementation it times,
    # each checked against the dense result, the routing crossover, the report) on CPU tensors, untimed, so a
    # broken benchmark is found before a GPU session spends its minutes on it.
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(BENCHMARKS.parent)}
    cmd = [sys.executable, str(BENCHMARKS / "bench_nf4_kernels.py"), "--interpret", "--quick", "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = result.stdout
    assert "Routing crossover (nf4_matmul.DENSE_MIN_M is 2048)" in out
    for row in ("| decode | tiny q 136x256 | 1 | ours (nf4_linear_forward) |", "| routing | tiny q 136x256 | 16 |",
                "| train bwd (grad_x) | tiny q 136x256 | 24 | ours (nf4_linear_backward) |",
                "| dequantize | tiny q 136x256 |  | bnb dequantize_4bit |"):  # fmt: skip
        assert row in out, row
    assert list(tmp_path.glob("nf4_interpret_*.json")) and list(tmp_path.glob("nf4_interpret_*.md"))


def test_launch_retries_with_fewer_stages_when_shared_memory_is_short(monkeypatch):
    # A stand-in kernel that "needs" 50 KB per stage on a 101 KB GPU: _launch must try 3, then 2 stages, remember 2
    # for the next call (no second failure), and re-raise when even one stage does not fit.
    from triton.runtime.errors import OutOfResources

    class FakeKernel:
        __name__ = "fake_kernel"

        def __init__(self, per_stage, limit):
            self.per_stage, self.limit, self.tried = per_stage, limit, []

        def __getitem__(self, grid):
            def run(*args, num_warps, num_stages, **meta):
                self.tried.append(num_stages)
                if self.per_stage * num_stages > self.limit:
                    raise OutOfResources(self.per_stage * num_stages, self.limit, "shared memory")

            return run

    monkeypatch.setattr(mm, "_stages_that_fit", {})
    x = torch.zeros(2, 2)
    kernel = FakeKernel(per_stage=50_000, limit=101_376)
    mm._launch(kernel, (1,), (x,), {}, num_warps=8, num_stages=3)
    mm._launch(kernel, (1,), (x,), {}, num_warps=8, num_stages=3)
    assert kernel.tried == [3, 2, 2]
    too_big = FakeKernel(per_stage=200_000, limit=101_376)
    too_big.__name__ = "too_big"
    with pytest.raises(OutOfResources):
        mm._launch(too_big, (1,), (x,), {}, num_warps=8, num_stages=3)
    assert too_big.tried == [3, 2, 1]
