#!/usr/bin/env bash
# Every check that needs a GPU, in one short run, for whoever has one (no session so far had):
#   0. the offline SASS proxy for this GPU's architecture (seconds; no GPU needed, printed for comparison);
#   1. the tests marked `gpu`: every kernel test on CUDA tensors (Triton kernels compiled for real against their
#      PyTorch references), the NF4 linear and the QLoRA step on the GPU;
#   2. the NF4 kernel benchmark against bitsandbytes (gemv_4bit, matmul_4bit, dequantize_4bit) and cuBLAS bf16 on
#      Llama-3.2-1B / Llama-3-8B shapes: % of HBM bandwidth, and the routing crossover (the smallest M from which
#      dequantize + cuBLAS beats the fused GEMM: compare it with DENSE_MIN_M in kernels/nf4_matmul.py);
#      writes benchmarks/results/nf4_<gpu>_<date>.*;
#   3. the LoRA training benchmark against transformers + peft on the GPU (train_vs_peft_cuda_<date>.*);
#   4. the QLoRA training benchmark against transformers + bitsandbytes + peft (qlora_train_vs_peft_cuda_<date>.*);
#   5. with 2+ GPUs: tests/test_distributed.py on nccl and bench_distributed.py (distributed_cuda_<date>.*).
# Each benchmark has its own timeout; run them one by one if a single call must stay under 10 minutes
# (QUICK=1 runs step 2 on two shapes only).
# Steps whose oracle is not installed are reported and skipped; the exit status is that of the tests.
# Results go to benchmarks/results/ (and to $OUT too when it is set): commit them with the machine they name.
set -u
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # the interpreter runs kernels in NumPy: never for a GPU run
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's minilora, whatever is pip-installed
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA GPU here"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

cc=$(python3 -c "import torch; major, minor = torch.cuda.get_device_capability(); print(10 * major + minor)")
case "$cc" in 80|89|90) timeout 120 python3 benchmarks/kernel_sass_proxy.py --cc "$cc" --only "gemv M=1" \
    "gemm 128x128x64" dequantize || true ;; esac

python3 -P -m pytest -q -m gpu tests/ -p no:cacheprovider
status=$?

has() { python3 -c "import $1" 2>/dev/null; }
if has bitsandbytes; then
    timeout 300 python3 benchmarks/bench_nf4_kernels.py ${QUICK:+--quick} --note "benchmarks/gpu_checks.sh"
else
    echo "skipped bench_nf4_kernels.py: bitsandbytes is not installed"
fi
if has transformers && has peft; then
    timeout 300 python3 benchmarks/bench_train_vs_peft.py --device cuda --dtype bfloat16 --grad-checkpointing both
else
    echo "skipped bench_train_vs_peft.py: transformers/peft are not installed"
fi
if has transformers && has peft && has bitsandbytes; then
    timeout 200 python3 benchmarks/bench_train_vs_peft.py --method qlora --device cuda --dtype bfloat16 \
        --grad-checkpointing both --no-inference
else
    echo "skipped bench_train_vs_peft.py --method qlora: transformers/peft/bitsandbytes are not installed"
fi
# --- distributed (bench/test owner: the torchrun helper) ------------------------------------------------------
# With two or more GPUs: the 2-process equivalence tests on nccl (DDP LoRA and FSDP2 QLoRA: the LoRA weights of
# torchrun --nproc-per-node 2 equal one process on the global batch, within 1e-5), then 1 vs 2 GPU throughput.
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    MINILORA_TEST_DEVICE=cuda timeout 300 python3 -P -m pytest -q -p no:cacheprovider tests/test_distributed.py \
        -k "equal_one_process" || status=1
    timeout 300 python3 benchmarks/bench_distributed.py --device cuda --rounds 2 --steps 6 \
        --note "benchmarks/gpu_checks.sh" || true
else
    echo "skipped the 2-GPU checks (tests/test_distributed.py on nccl): fewer than 2 GPUs"
fi
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && cp benchmarks/results/nf4_* benchmarks/results/*cuda* "$OUT/results/" 2>/dev/null || true
fi
exit $status
