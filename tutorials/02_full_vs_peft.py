# %% [markdown]
# # 2. 전체 파인튜닝과 PEFT · Full fine-tuning vs PEFT
#
# **한국어** — 파인튜닝에는 두 가지 길이 있습니다. **전체 파인튜닝(full fine-tuning)** 은 모델의 모든 가중치를
# 학습하고, **PEFT(parameter-efficient fine-tuning, 파라미터 효율적 파인튜닝)** 는 원래 가중치를 얼려 두고 새로
# 더한 적은 수의 파라미터만 학습합니다.
# 이 장에서는 그 차이를 "느낌"이 아니라 **숫자**로 봅니다.
#
# 1. 모델의 파라미터 수를 설정(config)의 모양만으로 계산하고, minilora의 실제 모델과 맞는지 확인합니다.
# 2. 학습에 필요한 메모리(가중치 + 기울기 + AdamW 상태)를 파라미터당 바이트로 계산합니다.
# 3. LoRA의 학습 파라미터 수 Σ r·(d_in + d_out)를 계산하고 전체 파라미터와 비교합니다.
# 4. 작은 기본 모델에서 실제로 한 스텝을 학습하고, 기울기와 옵티마이저 상태가 차지한 바이트를 재서 계산과
#    맞춰 봅니다.
#
# **English** — There are two roads. **Full fine-tuning** trains every weight of the model; **PEFT
# (parameter-efficient fine-tuning)** freezes the original weights and trains a small number of added parameters.
# This chapter compares them with **numbers**, not impressions:
#
# 1. compute a model's parameter count from its config shapes alone and check it against minilora's real model;
# 2. compute the training memory (weights + gradients + AdamW states) from bytes per parameter;
# 3. compute LoRA's trainable count Σ r·(d_in + d_out) and compare it with the total;
# 4. take one real training step on the small default model, measure the bytes its gradients and optimizer states
#    occupy, and match them with the arithmetic.

# %%
import torch

import _course
from minilora.formats.safetensors_folder import load_model
from minilora.lora import apply_lora, count_parameters, parameter_summary
from minilora.loss import next_token_loss
from minilora.plot import line_chart

GiB = 2**30

# %% [markdown]
# ## 2.1 파라미터 수를 모양으로 세기 · Counting parameters from shapes
#
# **한국어** — Llama 계열 모델의 한 블록에는 어텐션의 네 선형층(q, k, v, o)과 MLP의 세 선형층(gate, up, down),
# 그리고 RMSNorm 두 개가 있습니다. 선형층 하나의 가중치는 `d_out × d_in`개입니다. GQA(grouped-query attention)
# 에서는 k, v의 헤드 수(`num_key_value_heads`)가 q보다 적어서 k, v 층이 작습니다. 여기에 어휘 임베딩(`V × C`)과
# 출력층(lm_head; 임베딩과 가중치를 공유(tied)하면 추가 파라미터 0)을 더하면 전체가 됩니다. 아래 함수가 그 계산을
# 그대로 적은 것입니다.
#
# **English** — A Llama-family block holds the four attention linears (q, k, v, o), the three MLP linears (gate,
# up, down) and two RMSNorms. A linear layer has `d_out × d_in` weights. With grouped-query attention (GQA) k and
# v have fewer heads (`num_key_value_heads`) than q, so those layers are smaller. Add the token embedding
# (`V × C`) and the output head (lm_head; zero extra when tied to the embedding) and you have the total. The
# function below writes exactly that out.


# %%
def linear_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear layer of one Llama block."""
    C, I = shape["hidden_size"], shape["intermediate_size"]
    H, KV = shape["num_attention_heads"], shape["num_key_value_heads"]
    D = C // H  # head dimension
    return {"q_proj": (C, H * D), "k_proj": (C, KV * D), "v_proj": (C, KV * D), "o_proj": (H * D, C),
            "gate_proj": (C, I), "up_proj": (C, I), "down_proj": (I, C)}


def parameter_count(shape: dict) -> dict[str, int]:
    """Parameters of a Llama model by group, from its config shapes."""
    C, L, V = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    linears = sum(d_in * d_out for d_in, d_out in linear_shapes(shape).values())
    groups = {
        "embedding": V * C,
        "linears (all blocks)": L * linears,
        "norms": L * 2 * C + C,  # two RMSNorm gains per block + the final norm
        "lm_head": 0 if shape["tie_word_embeddings"] else V * C,
    }
    groups["total"] = sum(groups.values())
    return groups


# %% [markdown]
# **한국어** — 먼저 작은 기본 모델로 확인합니다. 설정 파일의 모양으로 계산한 값과 minilora가 실제로 만든 모델의
# 파라미터 수(`count_parameters`)가 같아야 합니다. 셀 마지막의 `assert`가 이를 검사합니다.
#
# **English** — First, the small default model: the count computed from its config shapes must equal the
# parameters of the model minilora actually built (`count_parameters`); the `assert` at the end of the cell
# checks it.

# %%
model_dir = _course.default_model()
model = load_model(model_dir)
cfg = model.config
tiny_shape = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                  intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size,
                  tie_word_embeddings=cfg.tie_word_embeddings)
counted = parameter_count(tiny_shape)
for group, n in counted.items():
    print(f"{group:22}{n:>12,}")
_, actual = count_parameters(model)
print(f"{'minilora model':22}{actual:>12,}")
assert counted["total"] == actual

# %% [markdown]
# **한국어** — 이제 실제 모델입니다. 가중치를 내려받을 필요는 없습니다. 공개된 `config.json`의 모양(은닉 차원,
# 층 수, MLP 폭, 헤드 수, 어휘 크기)만 있으면 됩니다. 같은 함수로 계산하고, 검산으로 minilora의 `Transformer`를
# **meta 장치**(모양만 있고 메모리는 쓰지 않는 가짜 장치)에 만들어 실제 파라미터 수와 비교합니다.
#
# **English** — Now real models. No weights need downloading: the shapes of the published `config.json` (hidden
# size, layers, MLP width, heads, vocabulary) are enough. The same function computes the counts and, as a check,
# minilora's own `Transformer` is built on the **meta device** (shapes without memory) and its parameters counted.

# %%
print(f"{'model':14}{'hidden':>7}{'layers':>7}{'MLP':>7}{'heads/kv':>9}{'vocab':>8}{'tied':>6}{'parameters':>16}")
real_counts = {}
for name, shape in _course.REAL_MODELS.items():
    n = parameter_count(shape)["total"]
    _, on_meta = count_parameters(_course.meta_model(shape))
    assert n == on_meta, (name, n, on_meta)
    real_counts[name] = n
    print(f"{name:14}{shape['hidden_size']:>7}{shape['num_hidden_layers']:>7}{shape['intermediate_size']:>7}"
          f"{shape['num_attention_heads']:>5}/{shape['num_key_value_heads']:<3}{shape['vocab_size']:>8}"
          f"{str(shape['tie_word_embeddings']):>6}{n:>16,}")

# %% [markdown]
# **한국어** — 이름에 붙은 "1B", "8B"가 위 셀이 계산한 파라미터 수와 맞는지 보세요. 어휘가 크기 때문에 임베딩(과
# 가중치를 공유하지 않는 출력층)이 전체에서 적지 않은 몫을 차지하며, 가장 작은 모델에서 그 몫이 가장 큽니다(아래
# 셀이 비율을 출력합니다).
#
# **English** — Check the "1B" and "8B" in the names against the counts the cell computed. The vocabulary is large,
# so the embedding (and an untied output head) is a sizeable share of the total, largest for the smallest model
# (the next cell prints the shares).

# %%
shares = {}
for name, shape in _course.REAL_MODELS.items():
    groups = parameter_count(shape)
    shares[name] = (groups["embedding"] + groups["lm_head"]) / groups["total"]
    print(f"{name:14} embedding + lm_head = {shares[name]:.1%} of the parameters")
assert max(shares, key=shares.get) == min(real_counts, key=real_counts.get)

# %% [markdown]
# ## 2.2 전체 파인튜닝의 메모리 · Memory of full fine-tuning
#
# **한국어** — 학습 중에는 파라미터마다 여러 개의 숫자를 메모리에 들고 있어야 합니다.
#
# - **가중치** 자체,
# - 역전파가 만든 **기울기(gradient)**, 가중치와 같은 크기,
# - **AdamW 상태** 두 개: 기울기의 이동 평균 `m`과 제곱의 이동 평균 `v`,
# - 혼합 정밀도(mixed precision)로 학습하면 bf16 가중치 옆에 fp32 **마스터 가중치**를 하나 더 둡니다. 작은
#   업데이트가 bf16의 반올림에 묻혀 사라지지 않게 하기 위해서입니다.
#
# fp32는 4바이트, bf16은 2바이트입니다. 아래 표의 "B/param"은 이 항목들을 더한 값입니다. 활성값(activation)은 배치
# 크기와 시퀀스 길이에 따라 달라지므로 표에서 뺐습니다(실제 학습에서는 여기에 더해집니다).
#
# **English** — During training each parameter brings several numbers into memory:
#
# - the **weight** itself;
# - its **gradient** from backpropagation, the same size;
# - two **AdamW states**: the running mean of the gradient `m` and of its square `v`;
# - with mixed precision, an fp32 **master weight** beside the bf16 weight, so that small updates are not rounded
#   away by bf16.
#
# fp32 takes 4 bytes, bf16 2. "B/param" in the table below adds these up; activations depend on batch size and
# sequence length and are left out (in practice they come on top).

# %%
# bytes per parameter: (weights, gradients, optimizer state incl. master weights)
SCHEMES = {
    "fp32": (4, 4, 4 + 4),  # m + v
    "bf16 mixed": (2, 2, 4 + 4 + 4),  # fp32 master + m + v
    "pure bf16": (2, 2, 2 + 2),  # m, v in bf16 too
}
for scheme, parts in SCHEMES.items():
    print(f"{scheme:12} weights {parts[0]} + grads {parts[1]} + optimizer {parts[2]} = {sum(parts)} B/param")


def full_ft_gib(n_params: int, scheme: str) -> float:
    return n_params * sum(SCHEMES[scheme]) / GiB


print(f"\n{'model':14}" + "".join(f"{s:>16}" for s in SCHEMES) + f"{'bf16 inference':>16}")
for name, n in real_counts.items():
    row = "".join(f"{full_ft_gib(n, s):>12.1f} GiB" for s in SCHEMES)
    print(f"{name:14}{row}{n * 2 / GiB:>12.1f} GiB")

# %% [markdown]
# **한국어** — "bf16 mixed" 열이 fp32 열과 **같습니다**(아래 셀이 계산합니다). 혼합 정밀도는 가중치·기울기를 2바이트로
# 줄인 만큼을 fp32 마스터 가중치(4바이트)에 다시 쓰기 때문입니다. 혼합 정밀도가 아끼는 것은 이 표에 없는 두
# 가지입니다. 하나는 **활성값**입니다. 역전파를 위해 저장하는 중간값이 bf16이라 크기가 절반이며, 배치가 크거나
# 시퀀스가 길면 이것이 가장 큰 항목입니다. 다른 하나는 **시간**입니다. GPU의 텐서 코어는 bf16 행렬 곱을 fp32보다 몇
# 배 빨리 계산합니다. 가중치 쪽 메모리까지 줄이려면 "pure bf16"(업데이트가 반올림으로 사라질 위험이 있으며, 8장에서
# 측정합니다)이나 LoRA(아래)가 필요합니다.
#
# **English** — The "bf16 mixed" column **equals** the fp32 one (the cell below computes it): what mixed precision
# saves by keeping weights and gradients in 2 bytes it spends again on the fp32 master weights (4 bytes). What it does
# save is missing from this table: **activations** — the intermediate values stored for backward are bf16, half the
# size, and with large batches or long sequences they are the largest item — and **time**: a GPU's tensor cores
# multiply bf16 matrices several times faster than fp32. Cutting the weight-side memory takes "pure bf16" (whose
# updates risk rounding away, measured in chapter 8) or LoRA (below).

# %%
print("B/param:", {scheme: sum(parts) for scheme, parts in SCHEMES.items()})
assert sum(SCHEMES["bf16 mixed"]) == sum(SCHEMES["fp32"])  # mixed precision saves no weight-side memory

# %% [markdown]
# **한국어** — 위 표를 24 GiB(소비자용 GPU)나 80 GiB(데이터센터 GPU)와 비교해 보세요. 추론에는 가중치만 있으면
# 되지만, 전체 파인튜닝에는 활성값을 빼고도 그 몇 배가 필요합니다. 아래 셀은 각 모델이 어느 GPU에 들어가는지
# (활성값 제외) 계산합니다.
#
# **English** — Compare the table with 24 GiB (a consumer GPU) and 80 GiB (a data-centre GPU). Inference needs only
# the weights; full fine-tuning needs several times that before any activation. The next cell computes which model
# fits where (activations excluded).

# %%
for name, n in real_counts.items():
    need = full_ft_gib(n, "bf16 mixed")
    print(f"{name:14} full FT (bf16 mixed) needs {need:6.1f} GiB: "
          f"fits in 24 GiB: {need <= 24}, in 80 GiB: {need <= 80}")

# %% [markdown]
# ## 2.3 PEFT: LoRA의 학습 파라미터 · PEFT: LoRA's trainable parameters
#
# **한국어** — LoRA(4장에서 자세히 다룹니다)는 선형층 `W`(d_out × d_in)를 얼려 두고, 그 옆에 작은 두 행렬
# `A`(r × d_in)와 `B`(d_out × r)를 둡니다. 층 하나의 학습 파라미터는 **r·(d_in + d_out)** 개로, 원래의
# d_in·d_out개보다 훨씬 적습니다. 어느 층에 붙일지(`targets`)도 고릅니다. 원 논문처럼 `q_proj`, `v_proj`에만
# 붙이거나, 블록의 모든 선형층(`all-linear`)에 붙입니다.
#
# 아래 셀은 이 합을 직접 계산하고, minilora의 `apply_lora`를 meta 모델에 실제로 적용한 뒤 `count_parameters`가
# 센 값과 비교합니다.
#
# **English** — LoRA (chapter 4) freezes a linear layer `W` (d_out × d_in) and adds two small matrices beside it,
# `A` (r × d_in) and `B` (d_out × r). One layer trains **r·(d_in + d_out)** parameters instead of d_in·d_out. We also
# choose where to put them (`targets`): on `q_proj` and `v_proj` only, as in the original paper, or on every linear
# of the blocks (`all-linear`).
#
# The cell below computes the sum directly and compares it with what `count_parameters` counts after minilora's
# `apply_lora` is really applied to the meta model.


# %%
def lora_trainable(shape: dict, r: int, targets) -> int:
    """Σ r·(d_in + d_out) over the targeted linears of every block."""
    per_block = sum(r * (d_in + d_out) for name, (d_in, d_out) in linear_shapes(shape).items()
                    if targets == "all-linear" or name in targets)
    return shape["num_hidden_layers"] * per_block


lora_rows = []
print(f"{'model':14}{'r':>4}{'targets':>18}{'trainable':>14}{'of total':>10}")
for name, shape in _course.REAL_MODELS.items():
    for r in (8, 16):
        for targets in (("q_proj", "v_proj"), "all-linear"):
            n = lora_trainable(shape, r, targets)
            meta = _course.meta_model(shape)
            apply_lora(meta, r=r, alpha=2 * r, targets=targets)
            trainable, _ = count_parameters(meta)
            assert n == trainable, (name, r, targets, n, trainable)
            label = targets if isinstance(targets, str) else ",".join(targets)
            lora_rows.append((name, r, label, n))
            print(f"{name:14}{r:>4}{label:>18}{n:>14,}{n / real_counts[name]:>10.3%}")
    assert lora_trainable(shape, 16, "all-linear") == 2 * lora_trainable(shape, 8, "all-linear")  # linear in r

# %% [markdown]
# **한국어** — 위 표에서 학습 파라미터는 전체의 아주 작은 비율(마지막 열)에 불과합니다. r을 두 배로 하면 학습
# 파라미터도 정확히 두 배가 됩니다. 식이 r에 비례하기 때문입니다. 그렇다면 메모리는 얼마나 줄어들까요? 얼린 가중치는
# bf16으로 한 번만 들고 있으면 되고, 기울기도 옵티마이저 상태도 필요 없습니다. LoRA의 학습 파라미터만 fp32로
# 가중치·기울기·Adam 상태를 가집니다.
#
# **English** — The trainable parameters are a small percentage of the total, and doubling r doubles them exactly
# (the formula is linear in r). And the memory? The frozen weights are held once, in bf16, with no gradient and no
# optimizer state; only the LoRA parameters carry fp32 weights, gradients and Adam states.


# %%
def lora_gib(n_params: int, n_trainable: int, base_bytes: float = 2) -> float:
    return (n_params * base_bytes + n_trainable * (4 + 4 + 4 + 4)) / GiB


print(f"{'model':14}{'full FT (bf16 mixed)':>22}{'LoRA r=16 all-linear':>22}{'ratio':>8}")
for name, shape in _course.REAL_MODELS.items():
    n, t = real_counts[name], lora_trainable(shape, 16, "all-linear")
    full, lora = full_ft_gib(n, "bf16 mixed"), lora_gib(n, t)
    print(f"{name:14}{full:>18.1f} GiB{lora:>18.1f} GiB{full / lora:>7.1f}×")
    assert lora < full

# %% [markdown]
# **한국어** — 아래 그림은 모델 크기에 따른 학습 메모리를 방법별로 그리고, 24 GiB와 80 GiB GPU를 가로선으로
# 표시합니다(활성값 제외). 범례는 그림 오른쪽, 그래프 밖에 있습니다. LoRA의 선이 추론(가중치만)의 선과 거의 겹치는
# 것을 보세요. 두 선의 차이는 LoRA 학습 파라미터의 fp32 가중치·기울기·Adam 상태(모델마다 1 GiB 미만, 셀이 출력)뿐이라서,
# 이 세로축 범위에서는 LoRA의 선이 추론의 선 바로 위에 포개져 보입니다. 얼린 가중치를 4비트로 줄이는 QLoRA는 5장과
# 8장에서 다룹니다.
#
# **English** — The figure below draws training memory against model size for each method, with 24 GiB and
# 80 GiB GPUs as horizontal lines (activations excluded); the legend sits right of the plot, outside the data. Note
# how close LoRA's line runs to inference (weights only): the two differ only by the fp32 weights, gradients and
# Adam states of LoRA's trainable parameters (under 1 GiB per model, printed by the cell), so at this scale LoRA's
# line lies right on top of inference's. QLoRA, which shrinks the
# frozen weights to 4 bits, comes in chapters 5 and 8.

# %%
sizes = {name: n / 1e9 for name, n in real_counts.items()}
models = list(real_counts)
series = {
    "full FT, bf16 mixed": [(sizes[m], full_ft_gib(real_counts[m], "bf16 mixed")) for m in models],
    "full FT, pure bf16": [(sizes[m], full_ft_gib(real_counts[m], "pure bf16")) for m in models],
    "inference, bf16 weights": [(sizes[m], real_counts[m] * 2 / GiB) for m in models],
    "LoRA r=16 all-linear, bf16 base": [  # drawn after inference, so that it shows on top of that line
        (sizes[m], lora_gib(real_counts[m], lora_trainable(_course.REAL_MODELS[m], 16, "all-linear"))) for m in models],
    "a 24 GiB GPU": [(sizes[models[0]], 24), (sizes[models[-1]], 24)],
    "an 80 GiB GPU": [(sizes[models[0]], 80), (sizes[models[-1]], 80)],
}
path = line_chart(series, _course.figure_path("02_training_memory.svg"), title="Training memory without activations",
                  xlabel="parameters (billions)", ylabel="GiB")
_course.show_figure(path)
gap = max(lora - weights for (_, lora), (_, weights) in zip(series["LoRA r=16 all-linear, bf16 base"],
                                                            series["inference, bf16 weights"]))
print(f"LoRA's line lies at most {gap:.2f} GiB above inference's")
assert gap < 1  # the text's "under 1 GiB per model"

# %% [markdown]
# ## 2.4 실제로 재 보기 · Measuring it for real
#
# **한국어** — 계산이 맞는지 작은 기본 모델로 실제 학습 스텝을 한 번씩 밟아 확인합니다. 전체 파인튜닝과 LoRA(r=8,
# all-linear) 각각에 대해 AdamW로 한 스텝을 학습한 뒤, 실제로 존재하는 기울기 텐서와 옵티마이저 상태 텐서의 바이트
# 수를 더합니다. fp32로 학습하므로 기울기는 학습 파라미터당 4바이트, Adam 상태는 8바이트여야 합니다.
#
# **English** — To check the arithmetic, take one real training step on the small default model, once with full
# fine-tuning and once with LoRA (r=8, all-linear): after one AdamW step, add up the bytes of the gradient tensors
# and optimizer-state tensors that actually exist. Training is in fp32, so gradients should take 4 bytes and Adam
# states 8 bytes per trainable parameter.


# %%
def one_step_bytes(model) -> dict:
    """Train one AdamW step on a fixed random batch; return the bytes of gradients and optimizer states."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))  # (B, T)
    loss, _ = next_token_loss(model(ids), ids)
    loss.backward()
    optimizer.step()
    grads = sum(p.grad.nbytes for p in params)
    states = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if t.numel() > 1)  # m, v
    trainable, total = count_parameters(model)
    return {"trainable": trainable, "total": total, "grad bytes": grads, "Adam bytes": states}


full_model = load_model(model_dir).train().requires_grad_(True)
full = one_step_bytes(full_model)
lora_model = load_model(model_dir).train()
apply_lora(lora_model, r=8, alpha=16, targets="all-linear")
print(parameter_summary(lora_model))
lora = one_step_bytes(lora_model)

print(f"\n{'':12}{'trainable':>12}{'grad bytes':>14}{'Adam bytes':>14}")
for label, m in (("full FT", full), ("LoRA r=8", lora)):
    print(f"{label:12}{m['trainable']:>12,}{m['grad bytes']:>14,}{m['Adam bytes']:>14,}")
    assert m["grad bytes"] == 4 * m["trainable"] and m["Adam bytes"] == 8 * m["trainable"]
assert lora["trainable"] == lora_trainable(tiny_shape, 8, "all-linear")
print(f"\nLoRA keeps {lora['Adam bytes'] / full['Adam bytes']:.2%} of full fine-tuning's optimizer memory")

# %% [markdown]
# ## 정리 · Summary
#
# **한국어**
# - 파라미터 수는 설정의 모양만으로 정확히 계산됩니다. 위 셀들은 그 계산이 minilora의 실제 모델과 일치함을
#   `assert`로 확인했습니다.
# - 전체 파인튜닝은 파라미터당 여러 개의 숫자(가중치, 기울기, Adam의 m과 v, 혼합 정밀도라면 마스터 가중치)를
#   들고 있어야 해서, 추론보다 몇 배의 메모리가 필요합니다.
# - LoRA는 학습 파라미터를 Σ r·(d_in + d_out)개로 줄여 기울기와 옵티마이저 상태를 거의 없앱니다. 남는 큰 몫은 얼린
#   가중치 자체이며, 5장의 4비트 양자화가 바로 그 부분을 줄입니다.
#
# **English**
# - Parameter counts follow exactly from the config shapes; the cells above asserted that the arithmetic matches
#   minilora's real model.
# - Full fine-tuning holds several numbers per parameter (weight, gradient, Adam's m and v, and with mixed
#   precision a master weight), several times the memory of inference.
# - LoRA cuts the trainable parameters to Σ r·(d_in + d_out), so gradients and optimizer states almost vanish. What
#   remains large is the frozen weights themselves — exactly what chapter 5's 4-bit quantization shrinks.

# %% [markdown]
# ## 연습 문제 · Exercises
#
# **한국어** — 함수를 채우고 셀을 다시 실행하세요(풀이: `tutorials/solutions/02_full_vs_peft.py`).
#
# 1. **r을 바꾸면 학습 파라미터는?** `lora_trainable(d_in, d_out, r)`: LoRA 층 하나의 학습 파라미터 수를 종이 위에서
#    예측하세요. 검사는 실제 `LoRALinear`의 파라미터를 셉니다.
# 2. **전체 파인튜닝의 바이트.** `full_ft_bytes(n)`: fp32 가중치, 기울기, AdamW의 두 모멘트를 합한 바이트 수를
#    돌려주세요. 검사는 AdamW 한 스텝 뒤의 텐서를 실제로 잽니다.
# 3. **모델 전체의 예측.** `predict_trainable(model, r, targets)`: LoRA를 붙이기 **전에** 학습 파라미터 수를
#    예측하세요(`minilora.lora.select_targets`가 감쌀 층의 이름을 알려 줍니다). 모델을 바꾸면 안 됩니다.
#
# **English** — Fill in the functions and run the cell again (solutions: `tutorials/solutions/02_full_vs_peft.py`).
#
# 1. **Change r, predict the trainable count.** `lora_trainable(d_in, d_out, r)`: predict one LoRA layer's trainable
#    parameters on paper; the check counts a real `LoRALinear`'s.
# 2. **Full fine-tuning's bytes.** `full_ft_bytes(n)`: fp32 weights, gradients and AdamW's two moments together; the
#    check measures the tensors after one AdamW step.
# 3. **A whole model.** `predict_trainable(model, r, targets)`: predict the trainable count **before** applying LoRA
#    (`minilora.lora.select_targets` names the layers it would wrap), without changing the model.

# %%
import _exercises  # noqa: E402  (the checks; tutorials/_exercises.py)

def lora_trainable(d_in: int, d_out: int, r: int) -> int:
    raise NotImplementedError  # your code here


def full_ft_bytes(n_params: int) -> int:
    raise NotImplementedError  # your code here


def predict_trainable(model, r: int, targets) -> int:
    raise NotImplementedError  # your code here


_exercises.try_it(_exercises.EXERCISES["2.1"], lora_trainable)
_exercises.try_it(_exercises.EXERCISES["2.2"], full_ft_bytes)
_exercises.try_it(_exercises.EXERCISES["2.3"], predict_trainable)
