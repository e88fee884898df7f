# %% [markdown]
# # 9. 병합과 내보내기 · Merging and exporting
#
# **한국어**
#
# LoRA 학습의 결과는 어댑터, 곧 층마다 작은 행렬 A와 B입니다. 어댑터는 작아서 저장하고 나누기 쉽고, 한 베이스
# 모델에 여러 어댑터를 바꿔 끼울 수 있습니다. 하지만 배포할 때는 보통 **병합(merge)** 합니다:
# W ← W₀ + (α/r)·B·A. 병합된 모델은 LoRA 코드가 전혀 없는 평범한 허깅페이스 체크포인트이고, 토큰마다 추가
# 비용도 없습니다. transformers, vLLM, llama.cpp 변환기 같은 도구가 그대로 읽을 수 있습니다.
#
# 이 장의 순서: 6장에서 학습한 어댑터 불러오기(없으면 여기서 빨리 하나 학습) → 어댑터 파일 살펴보기(PEFT 형식,
# 크기) → `merge_lora`로 병합하고 로짓이 그대로인지 확인 → `save_model` / `python -m minilora.merge`로 저장 →
# 다시 불러와 비교 → bfloat16으로 내보내기.
#
# **English**
#
# The result of LoRA training is an adapter: small matrices A and B per layer. Adapters are small to store and
# share, and several can be swapped on one base model. For deployment one usually **merges**: W ← W₀ + (α/r)·B·A.
# The merged model is an ordinary Hugging Face checkpoint with no LoRA code and no extra cost per token; tools like
# transformers, vLLM or llama.cpp's converter read it as is.
#
# The path: load the adapter trained in chapter 6 (or quickly train one here if it is absent) → look at the adapter
# files (PEFT format, sizes) → merge with `merge_lora` and check that the logits do not change → save with
# `save_model` / `python -m minilora.merge` → reload and compare → export in bfloat16.

# %%
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

import _course
from minilora.adapter import load_adapter, lora_modules
from minilora.formats.safetensors_folder import load_model, save_model
from minilora.generation import generate
from minilora.lora import LoRALinear, count_parameters, merge_lora
from minilora.merge import merge
from minilora.plot import line_chart
from minilora.tokenizer import load_tokenizer
from minilora.train import train
from minilora.train_config import TrainConfig

torch.manual_seed(0)
T0 = time.time()
FAST = _course.FAST


run_dir = _course.run_dir  # where a training run goes (a temp folder, outside the repository)


MODEL_DIR = _course.default_model()
tokenizer = load_tokenizer(MODEL_DIR)
print("fast mode:", FAST, "| base model:", MODEL_DIR)

# %% [markdown]
# ## 9.1 어댑터 준비 · The adapter
#
# **한국어**
#
# 6장을 먼저 실행했다면 그 어댑터를 씁니다. 없거나 다른 베이스 모델용이면 여기서 작은 어댑터를 빨리 학습합니다.
# 그래서 이 장은 혼자서도 실행됩니다.
#
# **English**
#
# If chapter 6 ran first, we use its adapter. If it is absent, or was trained on another base model, we quickly
# train a small one here, so this chapter also runs on its own.

# %%
def usable(adapter: Path) -> bool:
    config = adapter / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text())["base_model_name_or_path"] == str(MODEL_DIR)


ADAPTER = run_dir("06_base_finetuning") / "adapter"
if usable(ADAPTER):
    print(f"using chapter 6's adapter: {ADAPTER}")
else:
    run = run_dir("09_merge_and_export") / "train"
    shutil.rmtree(run, ignore_errors=True)
    print(f"no chapter-6 adapter at {ADAPTER}: training a small one in {run}")
    train(TrainConfig(model=str(MODEL_DIR), data=str(_course.default_data("domain.txt")), mode="base",
                      method="lora", r=16, alpha=32.0, targets="all-linear", block_size=128, batch_size=8, lr=2e-3,
                      warmup_steps=_course.steps(5, 1), max_steps=_course.steps(40, 3), eval_every=0,
                      log_every=_course.steps(10, 1), output=str(run), seed=0, device="auto"))
    ADAPTER = run / "adapter"

# %% [markdown]
# ## 9.2 어댑터 파일 · The adapter files
#
# **한국어**
#
# 어댑터 폴더에는 파일이 두 개뿐입니다. PEFT(허깅페이스의 LoRA 라이브러리)와 같은 형식이라서 PEFT로도 그대로
# 불러올 수 있습니다.
#
# - `adapter_config.json`: r, `lora_alpha`, `target_modules`, 베이스 모델 경로 등.
# - `adapter_model.safetensors`: 층마다 `lora_A.weight` (r, d_in)와 `lora_B.weight` (d_out, r). 키 이름은
#   `base_model.model.` + 모델 안의 모듈 경로입니다.
#
# **English**
#
# The adapter folder holds just two files, in PEFT's format (Hugging Face's LoRA library), so PEFT loads them too:
#
# - `adapter_config.json`: r, `lora_alpha`, `target_modules`, the base model's path, ...
# - `adapter_model.safetensors`: per layer `lora_A.weight` (r, d_in) and `lora_B.weight` (d_out, r), keyed
#   `base_model.model.` + the module's path in the model.

# %%
def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


for f in sorted(ADAPTER.iterdir()):
    print(f"{f.name:28s} {f.stat().st_size:>10,} bytes")
adapter_config = json.loads((ADAPTER / "adapter_config.json").read_text())
print(json.dumps(adapter_config, indent=2))

with safe_open(str(ADAPTER / "adapter_model.safetensors"), framework="pt") as f:
    keys = list(f.keys())
    for key in keys[:4]:
        print(f"{key:70s} {tuple(f.get_slice(key).get_shape())}")
print(f"... {len(keys)} tensors")

base_size = (MODEL_DIR / "model.safetensors").stat().st_size
adapter_size = (ADAPTER / "adapter_model.safetensors").stat().st_size
print(f"\nadapter weights {adapter_size / 2**20:.2f} MiB vs base model weights {base_size / 2**20:.2f} MiB "
      f"({100 * adapter_size / base_size:.1f}%)")
assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

# %% [markdown]
# **한국어**
#
# 이 작은 모델에서는 어댑터가 베이스에 비해 꽤 큽니다. 은닉 크기가 작아서 r(d_in + d_out)과 d_in·d_out의 차이가
# 작기 때문입니다. 실제 모델에서는 훨씬 작아집니다. 같은 설정(r, all-linear)을 Llama-3-8B의 모양에 적용해 계산해
# 봅시다(가중치는 내려받지 않고 모양만 씁니다).
#
# **English**
#
# For this tiny model the adapter is fairly large next to the base: with a small hidden size, r(d_in + d_out) is not
# far from d_in·d_out. For real models it is far smaller. Let us apply the same settings (r, all-linear) to
# Llama-3-8B's shapes (no weights are downloaded; only shapes are used).

# %%
from minilora.lora import linear_names  # noqa: E402

r = adapter_config["r"]
meta = _course.meta_model(_course.REAL_MODELS["Llama-3-8B"])
n_adapter = sum(r * (meta.get_submodule(n).in_features + meta.get_submodule(n).out_features)
                for n in linear_names(meta))
n_base = sum(p.numel() for p in meta.parameters())
print(f"Llama-3-8B, r={r} all-linear: adapter {n_adapter / 1e6:.1f} M parameters "
      f"({4 * n_adapter / 2**20:.0f} MiB in float32) vs base {n_base / 1e9:.2f} B "
      f"({2 * n_base / 2**30:.1f} GiB in bfloat16): {100 * n_adapter / n_base:.2f}% of the parameters")

# %% [markdown]
# ## 9.3 병합 · Merging
#
# **한국어**
#
# 베이스 모델에 `load_adapter`로 어댑터를 붙이면, 어댑터가 가리키는 층들이 `LoRALinear`로 바뀝니다.
# `merge_lora`는 각 `LoRALinear`에 대해 ΔW = (α/r)·B·A를 float32로 계산해 W₀에 더하고(반올림은 한 번),
# `LoRALinear`를 원래의 `nn.Linear`로 되돌립니다. 계산 순서만 달라지므로 로짓은 float32 반올림 수준에서 같아야
# 합니다.
#
# **English**
#
# `load_adapter` turns the layers the adapter names into `LoRALinear`s around the base model's linears. `merge_lora`
# computes ΔW = (α/r)·B·A in float32 for each, adds it to W₀ (rounding once), and puts the plain `nn.Linear` back.
# Only the order of operations changes, so the logits must agree up to float32 rounding.

# %%
model = load_model(MODEL_DIR)
n_base_params = sum(p.numel() for p in model.parameters())
names = load_adapter(model, ADAPTER)
model.eval()  # dropout off for measuring (load_model already returns eval mode, and LoRA layers follow it)
trainable, total = count_parameters(model)
print(f"{len(names)} LoRA layers; {trainable:,} adapter parameters on a {n_base_params:,}-parameter base")

ids = torch.tensor([tokenizer.encode("Haneul Tea Garden is a tea farm on Dalmoru Island. 하늘 차밭은 달모루섬에 있다.")])
name = names[0]
layer = model.get_submodule(name)
w0 = layer.base.weight.detach().clone()  # (d_out, d_in)
delta = layer.delta_weight()  # (α/r)·B·A, (d_out, d_in)
print(f"{name}: W0 {tuple(w0.shape)}, ΔW rank {torch.linalg.matrix_rank(delta).item()} (r = {layer.r}), "
      f"|ΔW| / |W0| = {(delta.norm() / w0.norm()).item():.3f}")

with torch.no_grad():
    logits_lora = model(ids)  # (1, T, V)
    merge_lora(model)
    logits_merged = model(ids)
merged_layer = model.get_submodule(name)
print(f"after merge_lora: {name} is a {type(merged_layer).__name__}; LoRA layers left: {len(lora_modules(model))}; "
      f"parameters {sum(p.numel() for p in model.parameters()):,}")
diff = (logits_lora - logits_merged).abs().max().item()
print(f"max |logits with adapter - merged logits| = {diff:.2e}")
assert diff < 1e-4
assert not any(isinstance(m, LoRALinear) for m in model.modules())
assert sum(p.numel() for p in model.parameters()) == n_base_params
assert torch.allclose(merged_layer.weight, w0 + delta, atol=1e-6)

# %% [markdown]
# **한국어**
#
# ΔW는 크기가 (d_out, d_in)인 행렬이지만 랭크는 r을 넘지 않습니다. 행렬을 그림으로 그려서는 잘 보이지 않지만,
# 특이값(singular value)을 크기순으로 그리면 분명합니다. W₀의 특이값은 완만하게 줄어들고, ΔW는 r개 뒤에서
# float32 반올림 수준으로 뚝 떨어집니다. 병합은 W₀에 이 낮은 랭크의 수정을 더하는 것입니다.
#
# **English**
#
# ΔW has shape (d_out, d_in) but rank at most r. A picture of the matrix hardly shows it; its singular values,
# sorted, do: W₀'s fall off gradually, ΔW's drop to float32 rounding level after the first r. Merging adds this low-rank
# correction to W₀.

# %%
sv_w0 = torch.linalg.svdvals(w0)  # (min(d_out, d_in),), sorted
sv_delta = torch.linalg.svdvals(delta)
rank = int((sv_delta > sv_delta[0] * 1e-4).sum())
print(f"{name}: {len(sv_w0)} singular values; ΔW has {rank} above 1e-4 of its largest (r = {layer.r}); "
      f"W0's smallest / largest = {(sv_w0[-1] / sv_w0[0]).item():.1e}")
assert rank <= layer.r
figure = line_chart({"W0": list(enumerate(sv_w0.tolist(), start=1)),
                     "ΔW = (α/r)·B·A": list(enumerate(sv_delta.tolist(), start=1))},
                    _course.figure_path("09_merge_singular_values.svg"), title=f"{name}: singular values",
                    xlabel="index (largest first)", ylabel="singular value", log_y=True)
_course.show_figure(figure)

# %% [markdown]
# ## 9.4 허깅페이스 체크포인트로 저장 · Saving a Hugging Face checkpoint
#
# **한국어**
#
# `save_model`은 `config.json`과 `model.safetensors`(큰 모델이면 여러 조각과 인덱스)를 씁니다. 완전한 모델
# 폴더가 되려면 토크나이저 파일도 있어야 합니다. 명령줄 도구 `python -m minilora.merge`는 불러오기 → 어댑터 붙이기
# → 병합 → 저장 → 토크나이저 파일 복사를 한 번에 합니다. 둘 다 해 보고 결과를 비교합니다.
#
# **English**
#
# `save_model` writes `config.json` and `model.safetensors` (shards and an index for large models). A complete model
# folder also needs the tokenizer files. The command-line tool `python -m minilora.merge` does load → add adapter →
# merge → save → copy the tokenizer files in one go. We do both and compare.

# %%
OUT = run_dir("09_merge_and_export")
by_hand, by_cli = OUT / "merged-by-hand", OUT / "merged-cli"
for folder in (by_hand, by_cli):
    shutil.rmtree(folder, ignore_errors=True)
save_model(model, by_hand)
print("save_model wrote:", sorted(f.name for f in by_hand.iterdir()))

command = [sys.executable, "-m", "minilora.merge", "--model", str(MODEL_DIR), "--adapter", str(ADAPTER),
           "--output", str(by_cli)]
print("$ python -m minilora.merge --model", MODEL_DIR, "--adapter", ADAPTER, "--output", by_cli)
result = subprocess.run(command, capture_output=True, text=True)
print(result.stdout + result.stderr)
assert result.returncode == 0
for f in sorted(by_cli.iterdir()):
    print(f"  {f.name:28s} {f.stat().st_size:>10,} bytes")

# %% [markdown]
# **한국어**
#
# 저장한 폴더를 minilora로 다시 불러와 로짓을 비교합니다. 병합된 모델만으로(어댑터 없이) 어댑터를 붙인 모델과
# 같은 글을 생성하는지도 확인합니다. 그리디 디코딩이라 토큰 하나하나가 같아야 합니다.
#
# **English**
#
# We reload the saved folders with minilora and compare logits, then check that the merged model alone (no adapter)
# generates the same text as the base model with the adapter — token for token, since decoding is greedy.

# %%
reloaded = load_model(by_cli)
reloaded_tokenizer = load_tokenizer(by_cli)  # the CLI copied the tokenizer files
with torch.no_grad():
    d_cli = (reloaded(ids) - logits_merged).abs().max().item()
    d_hand = (load_model(by_hand)(ids) - logits_merged).abs().max().item()
print(f"max logit difference after reloading: by hand {d_hand:.2e}, CLI {d_cli:.2e}")
assert d_hand == 0.0 and d_cli < 1e-5

with_adapter = load_model(MODEL_DIR)
load_adapter(with_adapter, ADAPTER)
with_adapter.eval()
prompt = torch.tensor([reloaded_tokenizer.encode("하늘 차밭은")])
out_merged = generate(reloaded, prompt, max_new_tokens=24, eos_token_ids=reloaded_tokenizer.eos_token_ids)
out_adapter = generate(with_adapter, prompt, max_new_tokens=24, eos_token_ids=tokenizer.eos_token_ids)
print("merged model:  ", reloaded_tokenizer.decode(out_merged[0], skip_special_tokens=True))
print("base + adapter:", tokenizer.decode(out_adapter[0], skip_special_tokens=True))
assert torch.equal(out_merged, out_adapter)

# %% [markdown]
# **한국어**
#
# 다른 도구로도 열리는지 확인합니다. transformers가 설치되어 있으면(minilora의 실행 의존성은 아닙니다)
# `AutoModelForCausalLM`으로 불러와 로짓을 비교합니다. 없으면 이 셀은 건너뜁니다.
#
# **English**
#
# Does another tool open it? If transformers is installed (it is not a minilora run-time dependency) we load the
# folder with `AutoModelForCausalLM` and compare logits; otherwise this cell is skipped.

# %%
if importlib.util.find_spec("transformers") is not None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    hf = AutoModelForCausalLM.from_pretrained(by_cli, dtype=torch.float32)
    with torch.no_grad():
        d_hf = (hf(ids).logits - logits_merged).abs().max().item()
    print(f"transformers loads the merged folder: max logit difference to minilora {d_hf:.2e}")
    assert d_hf < 1e-4
else:
    print("transformers is not installed: skipped")

# %% [markdown]
# ## 9.5 bfloat16으로 내보내기 · Exporting in bfloat16
#
# **한국어**
#
# 배포용 체크포인트는 보통 16비트입니다. `--dtype bfloat16`을 주면 W₀ + ΔW를 float32로 더한 뒤 한 번만
# bfloat16으로 반올림해서 저장합니다. 파일은 절반이 되고, 로짓은 bfloat16 반올림만큼 달라집니다.
#
# **English**
#
# Deployed checkpoints are usually 16-bit. With `--dtype bfloat16`, W₀ + ΔW is summed in float32 and rounded once to
# bfloat16. The file halves; the logits move by bfloat16 rounding.

# %%
by_bf16 = OUT / "merged-bf16"
shutil.rmtree(by_bf16, ignore_errors=True)
merge(MODEL_DIR, ADAPTER, by_bf16, dtype="bfloat16")
bf16_model = load_model(by_bf16)
with torch.no_grad():
    logits_bf16 = bf16_model(ids)
d_bf16 = (logits_bf16.float() - logits_merged).abs().max().item()
size32, size16 = (by_cli / "model.safetensors").stat().st_size, (by_bf16 / "model.safetensors").stat().st_size
print(f"config.json dtype: {json.loads((by_bf16 / 'config.json').read_text()).get('torch_dtype')}, "
      f"weights {size16 / 2**20:.2f} MiB vs {size32 / 2**20:.2f} MiB in float32 ({size16 / size32:.2f}x)")
print(f"max logit difference bfloat16 vs float32: {d_bf16:.3f} "
      f"(same greedy next token at {(logits_bf16.argmax(-1) == logits_merged.argmax(-1)).float().mean() * 100:.0f}% "
      f"of positions)")
assert next(bf16_model.parameters()).dtype == torch.bfloat16 and size16 < 0.6 * size32

# %% [markdown]
# **한국어**
#
# 정리: 어댑터(작은 파일 두 개, PEFT 형식)는 학습과 공유에, 병합된 체크포인트(보통의 허깅페이스 폴더)는 배포에
# 씁니다. 병합은 로짓을 바꾸지 않고(float32 반올림 수준), 병합된 모델만으로 어댑터를 붙인 모델과 똑같이 생성합니다.
# 4비트(QLoRA) 베이스로 학습한 어댑터도 같은 방법으로 **16/32비트 베이스**에 병합합니다.
#
# **English**
#
# Summary: the adapter (two small files, PEFT format) is for training and sharing; the merged checkpoint (an ordinary
# Hugging Face folder) is for deployment. Merging leaves the logits unchanged (up to float32 rounding), and the merged
# model alone generates exactly what the base model with the adapter does. An adapter trained on a 4-bit (QLoRA) base
# is merged the same way, into the **16/32-bit base**.

# %%
print(f"outputs in {OUT}")
print(f"chapter 9 ran in {time.time() - T0:.1f} s")

# %% [markdown]
# ## 연습 문제 · Exercises
#
# **한국어** — 함수를 채우고 셀을 다시 실행하세요(풀이: `tutorials/solutions/09_merge_and_export.py`).
#
# 1. **PEFT의 키 이름.** `peft_keys(module_names)`: LoRA를 붙인 모듈 이름들로 어댑터 파일의 텐서 이름을 만드세요.
#    9.2절에서 출력한 키와 같은 모양이어야 합니다.
# 2. **QLoRA 어댑터 병합.** `qlora_merge(q, A, B, scale)`: QLoRA 어댑터는 **역양자화한 NF4 가중치**를 상대로
#    학습되었습니다. 그 가중치에 ΔW를 더해야 병합한 층의 출력이 학습된 층과 같습니다. 원래의 16비트 베이스에
#    합치면 양자화 오차만큼 다른 모델이 됩니다.
#
# **English** — Fill in the functions and run the cell again (solutions: `tutorials/solutions/09_merge_and_export.py`).
#
# 1. **PEFT's key names.** `peft_keys(module_names)`: the adapter file's tensor names for LoRA on those modules; they
#    look like the keys printed in section 9.2.
# 2. **Merging a QLoRA adapter.** `qlora_merge(q, A, B, scale)`: a QLoRA adapter was trained against the
#    **dequantized NF4 weight**. Adding ΔW to that weight gives a merged layer whose outputs equal the trained
#    layer's; merging into the original 16-bit base gives a model that differs by the quantization error.

# %%
import _exercises  # noqa: E402  (the checks; tutorials/_exercises.py)

def peft_keys(module_names: list[str]) -> list[str]:
    raise NotImplementedError  # your code here


def qlora_merge(q, A, B, scale):
    raise NotImplementedError  # your code here


_exercises.try_it(_exercises.EXERCISES["9.1"], peft_keys)
_exercises.try_it(_exercises.EXERCISES["9.2"], qlora_merge)
