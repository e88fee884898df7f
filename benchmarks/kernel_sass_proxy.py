"""Offline proxy for the NF4 kernels' speed: compile them for A100 / L4-L40S / H100-H200 without a GPU, read the SASS.

No GPU is needed: Triton compiles for a named target (GPUTarget("cuda", cc, 32)) with no driver, and the CUDA
tools Triton ships (triton/backends/nvidia/bin: ptxas, cuobjdump, nvdisasm) give the machine code. For every
kernel, with the launcher's own settings (tiles, warps, stages, fp fusion: taken from kernels/*.py, not copied),
for sm_80, sm_89 and sm_90, it prints:

    registers per thread, shared memory per program, spills (local memory bytes and STL/LDL instructions),
    the main loop's SASS counts (global loads by width, shared loads/stores, tensor-core instructions, barriers),
    and two figures of merit derived from them.

The figures of merit ("proxies"). The issue asked for instructions per weight (GEMV target <= 4) and tensor-core
instructions per other main-loop instruction (GEMM target >= 1 per 8). The first is kept; the second is replaced,
because an HMMA (sm_80/89, one warp, m16n8k16 = 4096 FLOP) and an HGMMA (sm_90, a warpgroup, 64xNx16) do very
different amounts of work, so "1 per 8" means nothing across architectures. Both are turned into the fraction of
the hardware limit that the *instruction issue* alone would allow (one warp instruction per clock per scheduler,
four schedulers per SM; latency, occupancy and memory stalls are ignored, so this is a ceiling, not a forecast):

    GEMV / dequantize (memory-bound): budget = 128 thread-instructions per clock per SM divided by the weights
        per clock per SM that HBM delivers (bytes/clock/SM / 0.516 byte per weight); issue ceiling =
        min(1, budget / instructions per weight).  An H200 (4.8 TB/s, 132 SMs, 1.98 GHz) allows 3.5 instructions
        per weight, an A100-80GB 4.9: hence the "<= 4" target.
    GEMM (compute-bound): tensor cycles per loop iteration (FLOP / tensor FLOP per clock per SM) divided by issue
        cycles (warp instructions in the loop x warps / 4); issue ceiling = min(1, that ratio). An sm_90 HGMMA
        64x128x16 keeps the SM's tensor cores busy for 64 clocks, an sm_80 HMMA 16x8x16 for 2 clocks of one SM's
        four sub-cores' 8: the ratio accounts for that.

The "main loop" is the innermost backward branch of the SASS with the most instructions (the K loop); a kernel
without a loop (dequantize: one program per block) is counted whole. Instructions are per thread (a warp
instruction counts once), NOPs excluded. Weights per iteration come from the tile the launcher picks.

    python benchmarks/kernel_sass_proxy.py                      # all kernels, sm_80 / sm_89 / sm_90, bf16
    python benchmarks/kernel_sass_proxy.py --cc 90 --json out.json
    python benchmarks/kernel_sass_proxy.py --markdown results/kernel_sass_proxy_DATE.md --title "after"

Never run this with TRITON_INTERPRET=1 (the interpreter never compiles): the script unsets it for itself.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must happen before triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's warning; launchers pass the flag anyway

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Per compute capability: the GPU whose limits the ceilings use (datasheet figures; verify on the machine).
#   bytes_per_clk: HBM bytes per clock per SM = bandwidth / (SMs * boost clock)
#   tensor_flop_per_clk: dense bf16 FLOP per clock per SM with fp32 accumulation
GPUS = {
    80: dict(name="A100-SXM4-80GB", bytes_per_clk=2039e9 / (108 * 1.41e9), tensor_flop_per_clk=2048),
    89: dict(name="L40S", bytes_per_clk=864e9 / (142 * 2.52e9), tensor_flop_per_clk=1024),
    90: dict(name="H200 SXM", bytes_per_clk=4800e9 / (132 * 1.98e9), tensor_flop_per_clk=4096),
}
BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit code + 8-bit absmax code + fp32 nested absmax
ISSUE_PER_CLK = 4  # warp instructions per clock per SM (one per scheduler)
SPECIALIZE = True  # mark 16-divisible arguments as Triton's launcher would (--no-specialize: as if none were)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


# --- compile ---------------------------------------------------------------------------------------------------


def signature_of(kernel, dtype: str, pointers: dict) -> dict:
    """Triton signature: *dtype for activation pointers, the given types for the NF4 tensors, i32/fp32 scalars."""
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = pointers.get(p.name, "*" + dtype)
        else:
            signature[p.name] = "fp32" if p.name == "offset" else "i32"
    return signature


def jitted(kernel):
    """The @triton.jit function behind an @triton.autotune wrapper (or the function itself)."""
    while not hasattr(kernel, "params"):
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, dtype: str, pointers: dict, constexprs: dict, options: dict, cc: int, ints: dict):
    """triton.compile for compute capability `cc` with no GPU.

    At run time Triton specialises each launch on its arguments: a pointer whose address is a multiple of 16, or
    an integer that is, gets `tt.divisibility = 16` (what lets the compiler prove 16-byte alignment and vectorise).
    Offline there are no arguments, so this marks every pointer (torch allocations are 256-byte aligned) and the
    integers of `ints` (example values: name -> value, e.g. K = 4096) that are multiples of 16, as a launch on a
    real layer would. Integers equal to 1 are not specialised to constants here (Triton would: M = 1).
    """
    fn = jitted(kernel)
    signature = signature_of(fn, dtype, pointers)
    divisible = [i for i, p in enumerate(fn.params) if SPECIALIZE and not p.is_constexpr and (
        signature[p.name].startswith("*") or ints.get(p.name, 1) % 16 == 0)]  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)


# --- read the SASS ---------------------------------------------------------------------------------------------

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+):")
BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def disassemble(cubin: bytes) -> list[str]:
    """SASS instructions in order (labels kept as '.L_x_N:' lines)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(TOOLS / "nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True)
    out = []
    for line in text.stdout.splitlines():
        line = line.strip()
        if m := LABEL.match(line):
            out.append(m.group(1) + ":")
        elif m := INSTR.search(line):
            out.append(m.group(2))
    return out


def main_loop(lines: list[str]) -> tuple[list[str], bool]:
    """The innermost loop (backward branch) with the most instructions, or the whole kernel if it has none."""
    labels = {line[:-1]: i for i, line in enumerate(lines) if line.endswith(":")}
    loops = []
    for i, line in enumerate(lines):
        m = BRANCH.search(line)
        if m and labels.get(m.group(1), i) < i - 1:  # backward, and not the 1-instruction trap loop at the end
            loops.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    if not inner:
        return [x for x in lines if not x.endswith(":")], False
    a, b = max(inner, key=lambda ab: ab[1] - ab[0])
    return [x for x in lines[a : b + 1] if not x.endswith(":")], True


def opcode(instr: str) -> str:
    """'LDG.E.128.CONSTANT' from '@!P0 LDG.E.128.CONSTANT R4, desc[UR4][R2.64]'."""
    parts = instr.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def width(op: str) -> str:
    """Bits moved by a load/store: '128', '64', '8', '16', or '32' (no suffix)."""
    for suffix, bits in ((".128", "128"), (".64", "64"), (".U8", "8"), (".S8", "8"), (".U16", "16"), (".S16", "16")):
        if suffix in op:
            return bits
    return "32"


def classify(ops: list[str]) -> dict:
    c = Counter()
    for op in ops:
        base = op.split(".")[0]
        if base == "NOP":
            continue
        c["all"] += 1
        if base in ("LDG", "LDGSTS", "STG", "LDS", "STS", "LDSM", "STSM"):
            c[f"{base}.{width(op)}"] += 1
        elif base in ("UTMALDG", "UBLKCP", "UTMASTG"):
            c["TMA"] += 1
        elif base in ("HMMA", "HGMMA", "IMMA", "QGMMA", "UTCHMMA"):
            c["tensor"] += 1
            c[base] += 1
        elif base in ("BAR", "SYNCS", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "ARRIVES"):
            c["sync"] += 1
            c[base] += 1
        elif base in ("RED", "REDG", "ATOMG", "ATOM"):
            c["atomic"] += 1
        elif base in ("STL", "LDL"):
            c["spill"] += 1
        elif base in ("SHFL",):
            c["SHFL"] += 1
        elif base in ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "FMNMX"):
            c["float"] += 1
        elif base in ("F2F", "F2FP", "I2F", "F2I", "I2FP"):
            c["convert"] += 1
    return dict(c)


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory from cuobjdump -res-usage (local > 0 means spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in found.items()}


# --- the kernels, with the launchers' settings -----------------------------------------------------------------

NF4_POINTERS = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32", "nested_map_ptr": "*fp32",
                "quant_map_ptr": "*fp32"}  # fmt: skip


def kernel_specs(dtype: str = "bf16", cc: int = 90) -> list[dict]:
    """What each launcher would launch for a (4096 x 4096) double-quantized weight, for the M of interest.

    Each spec: name, kernel, constexprs and options (warps, stages, fp fusion) as the launcher passes them, ints
    (example integer arguments, for Triton's divisibility specialisation), weights (elements of W one main-loop
    iteration of one program covers), flops (per iteration, tensor-core kernels only) and, for the memory-bound
    kernels, bytes_per_weight when it is not the 4-bit weight's 0.516.
    """
    from minilora.kernels import nf4_dequant as dq
    from minilora.kernels import nf4_matmul as mm

    N = K = 4096
    specs = []
    meta = dq.dequant_meta(64, True)
    options = {k: meta.pop(k) for k in ("num_warps", "enable_fp_fusion")}
    out_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    specs.append(dict(name="dequantize", kernel=dq._nf4_dequant_kernel, constexprs=meta, options=options,
                      weights=meta["ROWS"] * 2 * meta["HALF"], bytes_per_weight=BYTES_PER_WEIGHT + out_bytes,
                      ints=dict(n_sub=N * K // 64)))  # fmt: skip
    for M in (1, 2, 4):  # decode: one token, or a few (speculative decoding, small batches)
        meta = mm.gemv_meta(M, 64, True)
        options = {k: meta.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion")}
        specs.append(dict(name=f"gemv M={M}", kernel=mm._nf4_gemv_kernel, constexprs={**meta, "SPLIT_K": 1},
                          options=options, weights=meta["BLOCK_N"] * 2 * meta["HALF"],
                          ints=dict(M=M, N=N, K=K, k_per_split=K, stride_xm=K, stride_ym=N)))  # fmt: skip
    for config in mm.GEMM_CONFIGS:  # every configuration the autotuner may pick
        blocks = config.kwargs
        meta = dict(QBLOCK=64, DOUBLE_QUANT=True, HALF=32, **blocks)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True)
        name = "gemm {BLOCK_N}x{BLOCK_M}x{BLOCK_K}".format(**blocks)
        specs.append(dict(name=name, kernel=mm._nf4_gemm_kernel, constexprs=meta, options=options,
                          weights=blocks["BLOCK_N"] * blocks["BLOCK_K"],
                          flops=2 * blocks["BLOCK_N"] * blocks["BLOCK_M"] * blocks["BLOCK_K"],
                          ints=dict(M=1024, N=N, K=K, stride_xm=K, stride_ym=N, M_BUCKET=1024)))  # fmt: skip
    block_m, block_n, block_k = mm.GRAD_BLOCK
    meta = dict(QBLOCK=64, DOUBLE_QUANT=True, HALF=32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    specs.append(dict(name="grad_input", kernel=mm._nf4_grad_input_kernel, constexprs=meta,
                      options=dict(num_warps=mm.GRAD_NUM_WARPS, num_stages=mm.GRAD_NUM_STAGES, enable_fp_fusion=True),
                      weights=block_n * block_k, flops=2 * block_m * block_n * block_k,
                      ints=dict(M=1024, N=N, K=K, stride_gym=N, stride_gxm=K)))  # fmt: skip
    return specs


def compile_spec(spec: dict, dtype: str, cc: int, num_stages: int | None = None):
    """Compile one spec of kernel_specs for `cc` (optionally with another pipeline depth)."""
    options = dict(spec["options"], **({"num_stages": num_stages} if num_stages else {}))
    pointers = {**NF4_POINTERS, **spec.get("pointers", {})}
    return compile_kernel(spec["kernel"], dtype, pointers, spec["constexprs"], options, cc, spec.get("ints", {}))


def analyse(spec: dict, dtype: str, cc: int) -> dict:
    compiled = compile_spec(spec, dtype, cc)
    cubin = compiled.asm["cubin"]
    lines = disassemble(cubin)
    body, is_loop = main_loop(lines)
    loop = classify([opcode(x) for x in body])
    whole = classify([opcode(x) for x in lines if not x.endswith(":")])
    usage = resource_usage(cubin)
    threads = 32 * spec["options"]["num_warps"]
    row = dict(kernel=spec["name"], cc=cc, dtype=dtype, warps=spec["options"]["num_warps"],
               stages=spec["options"].get("num_stages"), regs=usage.get("reg"), shared=compiled.metadata.shared,
               local=usage.get("local", 0) + usage.get("stack", 0), spill_instrs=whole.get("spill", 0),
               loop=is_loop, loop_instrs=loop.get("all", 0), counts=loop)  # fmt: skip
    gpu = GPUS[cc]
    weights_per_thread = spec["weights"] / threads
    row["instr_per_weight"] = loop.get("all", 0) / weights_per_thread
    if spec.get("flops"):
        tensor_clk = spec["flops"] / gpu["tensor_flop_per_clk"]
        issue_clk = loop.get("all", 0) * spec["options"]["num_warps"] / ISSUE_PER_CLK
        row["other_per_tensor"] = (loop["all"] - loop.get("tensor", 0)) / max(loop.get("tensor", 0), 1)
        row["issue_ceiling"] = min(1.0, tensor_clk / issue_clk)
    else:
        budget = ISSUE_PER_CLK * 32 / (gpu["bytes_per_clk"] / spec.get("bytes_per_weight", BYTES_PER_WEIGHT))
        row["budget_per_weight"] = budget
        row["issue_ceiling"] = min(1.0, budget / row["instr_per_weight"])
    return row


# --- report ----------------------------------------------------------------------------------------------------


def loads_summary(c: dict) -> str:
    keys = sorted(k for k in c if k.split(".")[0] in ("LDG", "LDGSTS", "STG", "LDS", "STS", "LDSM", "STSM"))
    return " ".join(f"{k}:{c[k]}" for k in keys) + (f" TMA:{c['TMA']}" if c.get("TMA") else "")


def to_markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| kernel | sm | warps/stages | regs | smem (B) | spills (B / instrs) | loop instrs | memory instrs in loop "
        "| tensor (kind) | sync | atomics | instr/weight | other/tensor | issue ceiling |",
        "|---|---|---|---:|---:|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["counts"]
        kinds = "/".join(f"{k}:{c[k]}" for k in ("HMMA", "HGMMA") if c.get(k))
        other = r.get("other_per_tensor")
        ceiling = f"{100 * r['issue_ceiling']:.0f}% " + ("tensor" if "flops" in r or other is not None else "HBM")
        lines.append(
            f"| {r['kernel']} | {r['cc']} | {r['warps']}/{r['stages']} | {r['regs']} | {r['shared']} | "
            f"{r['local']} / {r['spill_instrs']} | {r['loop_instrs']}{'' if r['loop'] else ' (no loop)'} | "
            f"{loads_summary(c)} | {c.get('tensor', 0)} {kinds} | {c.get('sync', 0)} | {c.get('atomic', 0)} | "
            f"{r['instr_per_weight']:.2f} | {'' if other is None else f'{other:.1f}'} | {ceiling} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cc", type=int, nargs="+", default=sorted(GPUS), help="compute capabilities (80 89 90)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--only", nargs="*", default=None, help="kernel names to analyse (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write every row (all counts) here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    parser.add_argument("--title", default="NF4 kernels, offline SASS proxy")
    parser.add_argument("--no-specialize", action="store_true",
                        help="compile without Triton's divisibility-by-16 specialisation (worst-case alignment)")
    args = parser.parse_args(argv)
    global SPECIALIZE
    SPECIALIZE = not args.no_specialize

    rows = []
    for cc in args.cc:
        for spec in kernel_specs(args.dtype, cc):
            if args.only and spec["name"] not in args.only:
                continue
            rows.append(analyse(spec, args.dtype, cc))
    report = to_markdown(rows, f"{args.title} ({args.dtype}, triton {triton.__version__})")
    print(report)
    if args.markdown:
        args.markdown.write_text(report, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
