# %% [markdown]
# # 4. LoRA · LoRA
#
# **한국어** — LoRA(Low-Rank Adaptation, Hu et al. 2021)는 사전학습된 선형층의 가중치 `W0`(d_out × d_in)를
# 얼려 두고, 그 옆에 **낮은 랭크의 업데이트** 하나만 학습합니다.
#
# $$y = W_0 x + \frac{\alpha}{r}\, B A x, \qquad A \in \mathbb{R}^{r\times d_{in}},\;
#   B \in \mathbb{R}^{d_{out}\times r},\; r \ll d_{in}, d_{out}$$
#
# 학습하는 것은 `A`와 `B`뿐이고, 그 곱 `ΔW = (alpha/r)·B·A`는 `W0`와 같은 모양이지만 랭크가 최대 r인 행렬입니다.
# `B`는 0으로 시작하므로 학습 첫 스텝의 모델은 원래 모델과 정확히 같습니다. 학습이 끝나면 `W0 + ΔW`를 계산해
# 보통의 가중치 하나로 병합(merge)할 수 있으므로 추론 비용이 전혀 늘지 않습니다.
#
# 이 장에서는 minilora의 `LoRALinear`(`minilora/lora.py`, 한 화면에 들어가는 구현)로
# 1) 작은 층 하나에서 A, B, ΔW를 그림으로 보고, 2) 랭크와 alpha가 하는 일을 재 보고, 3) 기본 모델에 LoRA를 붙여
# 학습 파라미터를 세고, 4) 병합해도 출력이 변하지 않음을 확인합니다.
#
# **English** — LoRA (Low-Rank Adaptation, Hu et al. 2021) freezes a pre-trained linear layer's weight `W0`
# (d_out × d_in) and learns a **low-rank update** beside it:
#
# $$y = W_0 x + \frac{\alpha}{r}\, B A x, \qquad A \in \mathbb{R}^{r\times d_{in}},\;
#   B \in \mathbb{R}^{d_{out}\times r},\; r \ll d_{in}, d_{out}$$
#
# Only `A` and `B` train; their product `ΔW = (alpha/r)·B·A` has the shape of `W0` but rank at most r. `B` starts at
# zero, so at step 0 the model is exactly the original one. After training `W0 + ΔW` can be computed and merged into
# an ordinary weight, so inference costs nothing extra.
#
# With minilora's `LoRALinear` (`minilora/lora.py`, an implementation that fits on one screen) this chapter
# 1) pictures A, B and ΔW of one small layer, 2) measures what rank and alpha do, 3) puts LoRA on the default
# model and counts its trainable parameters, and 4) checks that merging does not change the output.

# %%
import torch
from torch import nn

import _course
from minilora.formats.safetensors_folder import load_model
from minilora.data import load_base_data, pad_collate, pad_id
from minilora.lora import LoRALinear, apply_lora, count_parameters, merge_lora, parameter_summary
from minilora.loss import next_token_loss
from minilora.plot import heatmaps, line_chart
from minilora.tokenizer import load_tokenizer

torch.manual_seed(0)

# %% [markdown]
# ## 4.1 작은 층 하나 · One small layer
#
# **한국어** — d_in = 32, d_out = 24인 선형층을 r = 4의 `LoRALinear`로 감쌉니다. 아래 셀은 세 행렬의 모양과,
# 얼린 파라미터와 학습 파라미터의 수를 출력합니다. 학습 파라미터는 r·(d_in + d_out)개여야 합니다. 또 `B = 0`에서
# 시작하므로 LoRA 층의 출력이 원래 층과 **비트 단위로 같아야** 합니다.
#
# **English** — Wrap a linear layer with d_in = 32 and d_out = 24 in a `LoRALinear` of rank r = 4. The cell below
# prints the three matrices' shapes and the frozen and trainable parameter counts; the trainable count must be
# r·(d_in + d_out). And since `B` starts at 0, the LoRA layer's output must equal the original layer's **bit for
# bit**.

# %%
d_in, d_out, r, alpha = 32, 24, 4, 8
base = nn.Linear(d_in, d_out, bias=False)
with torch.no_grad():
    base.weight.normal_(0, 0.5)  # stands in for a pre-trained W0
layer = LoRALinear(base, r=r, alpha=alpha)
print(layer)
print(f"W0 = base.weight    {tuple(layer.base.weight.shape)}  requires_grad={layer.base.weight.requires_grad}")
print(f"A  = lora_A.weight  {tuple(layer.lora_A.weight.shape)}  requires_grad={layer.lora_A.weight.requires_grad}")
print(f"B  = lora_B.weight  {tuple(layer.lora_B.weight.shape)}  requires_grad={layer.lora_B.weight.requires_grad}")
trainable, total = count_parameters(layer)
print(f"trainable {trainable} = r·(d_in + d_out) = {r}·({d_in} + {d_out}); frozen {total - trainable} = d_in·d_out")
assert trainable == r * (d_in + d_out) and total - trainable == d_in * d_out

x = torch.randn(16, d_in)  # (N, d_in)
assert torch.equal(layer(x), base(x))  # B = 0: the LoRA path adds exactly nothing at step 0
print("at initialisation B is all zeros and the output equals the base layer's exactly")

# %% [markdown]
# ### 표기법: W + A×B와 코드의 B·A · Notation: W + A×B and the code's B·A
#
# **한국어** — 강의 자료는 LoRA를 흔히 $h = xW + x\,A\times B$로 씁니다. 여기서 $x$는 행 벡터, $A$는 $d_{in}\times r$
# ("A가 압축한다"), $B$는 $r\times d_{out}$("B가 펼친다")입니다. PyTorch의 `nn.Linear`는 가중치를 (d_out, d_in)으로
# 저장하고 $y = xW_0^\top$을 계산하므로, 코드(와 PEFT)의 `lora_A.weight`는 $A^\top$ (r × d_in), `lora_B.weight`는
# $B^\top$ (d_out × r)이고
#
# $$\Delta W_{\text{code}} = \tfrac{\alpha}{r}\,B_{\text{code}}A_{\text{code}} = \tfrac{\alpha}{r}\,(A\times B)^\top$$
#
# 입니다. 이름은 같고 모양만 전치되어 있습니다. 두 경우 모두 A가 입력을 r차원으로 줄이고 B가 d_out차원으로
# 펼칩니다.
#
# **왜 A는 Kaiming, B는 0인가.** B = 0이면 첫 스텝의 모델은 원래 모델과 같습니다(위에서 확인). 그런데 A까지 0이면
# 학습이 시작되지 않습니다. B의 기울기는 $\partial L/\partial B_{\text{code}} = g^\top (xA_{\text{code}}^\top)$
# ($g = \partial L/\partial y$)라서 A = 0이면 0이고, A의 기울기는 B에 비례하므로 B = 0이면 역시 0입니다. 둘 다 0에서
# 시작하면 둘 다 영원히 0에 머뭅니다. 그래서 A를 `nn.Linear`의 기본값(Kaiming 균등 분포, a = √5, 즉 $U(-1/\sqrt{d_{in}},
# 1/\sqrt{d_{in}})$)으로 두어 첫 스텝부터 B가 움직이게 합니다. 아래 셀이 세 가지 초기화의 기울기를 잽니다.
#
# **English** — Course material often writes LoRA as $h = xW + x\,A\times B$ with a row vector $x$, $A$ of shape
# $d_{in}\times r$ ("A compresses") and $B$ of shape $r\times d_{out}$ ("B expands"). PyTorch's `nn.Linear` stores its
# weight as (d_out, d_in) and computes $y = xW_0^\top$, so the code's (and PEFT's) `lora_A.weight` is $A^\top$
# (r × d_in) and `lora_B.weight` is $B^\top$ (d_out × r), and
#
# $$\Delta W_{\text{code}} = \tfrac{\alpha}{r}\,B_{\text{code}}A_{\text{code}} = \tfrac{\alpha}{r}\,(A\times B)^\top .$$
#
# Same names, transposed shapes: in both, A brings the input down to r dimensions and B expands it to d_out.
#
# **Why A is Kaiming and B is zero.** B = 0 makes the model at step 0 the original one (checked above). But if A
# were zero too, training would never start: B's gradient $g^\top (xA_{\text{code}}^\top)$ (with
# $g = \partial L/\partial y$) vanishes when A = 0, and A's gradient is proportional to B, so it vanishes when B = 0;
# both stay at zero forever. So A starts as `nn.Linear`'s default (Kaiming-uniform with a = √5, i.e.
# $U(-1/\sqrt{d_{in}}, 1/\sqrt{d_{in}})$), and B moves from the first step. The cell below measures the gradients
# for three initialisations.

# %%
A_seed, B_seed = layer.lora_A.weight.detach().T, torch.randn(r, d_out)  # the seed's A (d_in × r), B (r × d_out)
x = torch.randn(16, d_in)  # (N, d_in)
A_code, B_code = A_seed.T, B_seed.T  # lora_A.weight (r × d_in), lora_B.weight (d_out × r)
code_update = (alpha / r) * (x @ A_code.T) @ B_code.T  # LoRALinear: scale · lora_B(lora_A(x))
assert torch.allclose((alpha / r) * x @ (A_seed @ B_seed), code_update, atol=1e-5)
assert torch.allclose(B_code @ A_code, (A_seed @ B_seed).T)
print("seed's x·(A×B) equals the code's scale·lora_B(lora_A(x)); B_code·A_code = (A×B)ᵀ")

target_y = torch.randn(16, d_out)
print(f"{'init (A, B)':24}{'|grad A|':>10}{'|grad B|':>10}")
for label, A0, B0 in (("Kaiming A, B = 0", layer.lora_A.weight.detach(), torch.zeros(d_out, r)),
                      ("A = 0, B = 0", torch.zeros(r, d_in), torch.zeros(d_out, r)),
                      ("A = 0, random B", torch.zeros(r, d_in), torch.randn(d_out, r))):
    A_, B_ = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    (x @ base.weight.detach().T + (alpha / r) * x @ A_.T @ B_.T - target_y).pow(2).mean().backward()
    print(f"{label:24}{A_.grad.norm().item():>10.2e}{B_.grad.norm().item():>10.2e}")
    if label == "A = 0, B = 0":
        assert A_.grad.abs().max() == 0 and B_.grad.abs().max() == 0  # stuck: nothing ever moves
    if label == "Kaiming A, B = 0":
        assert A_.grad.abs().max() == 0 and B_.grad.norm() > 0  # B moves first, then A follows

# %% [markdown]
# **한국어** — 이제 이 층을 조금 학습시킵니다. 목표는 `W0`에 랭크 2짜리 변화를 더한 층을 흉내 내는 것입니다 (파인튜닝에
# 필요한 변화는 낮은 랭크라는 것이 LoRA의 가정입니다). `W0`는 얼어 있으므로 A와 B만 움직입니다. 아래 셀은 학습 전후의
# 손실을 출력하고 손실 곡선을 저장합니다.
#
# **English** — Now train this layer a little. The goal is to imitate `W0` plus a rank-2 change (LoRA's premise:
# the change fine-tuning needs is of low rank). `W0` is frozen, so only A and B move. The cell prints the loss
# before and after and saves the loss curve.

# %%
true_change = 0.3 * torch.randn(d_out, 2) @ torch.randn(2, d_in)  # (d_out, d_in), rank 2
target = base.weight.detach() + true_change
optimizer = torch.optim.Adam([layer.lora_A.weight, layer.lora_B.weight], lr=1e-2)
curve = []
for step in range(_course.steps(300, 100)):
    x = torch.randn(64, d_in)  # (N, d_in)
    loss = (layer(x) - x @ target.T).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    curve.append((step, loss.item()))
print(f"loss: step 0 {curve[0][1]:.4f} → step {curve[-1][0]} {curve[-1][1]:.4f}")
assert curve[-1][1] < curve[0][1] / 10
_course.show_figure(line_chart({"toy LoRA layer": curve}, _course.figure_path("04_toy_loss.svg"),
                               title="Training A and B of one layer", log_y=True))

# %% [markdown]
# ## 4.2 저랭크 업데이트를 그림으로 · The low-rank update as a picture
#
# **한국어** — 아래 그림은 `W0`, `B`, `A`, 그리고 `ΔW = (alpha/r)·B·A`를 하나의 색 척도(파랑 = 음수, 흰색 = 0,
# 빨강 = 양수)로 나란히 그립니다. 오른쪽 끝의 색 막대(colour bar)가 그 척도이며, 양 끝의 숫자는 네 행렬 전체에서
# 가장 큰 절댓값입니다. `ΔW`는 `W0`와 같은 크기의 행렬이지만, 좁은 `B`(r개의 열)와 납작한 `A`(r개의 행)의 곱이라서
# 줄무늬처럼 규칙적인 무늬를 가집니다. 모든 행이 A의 r개 행의 조합이기 때문입니다. A와 B의 칸이 옅게 보이는
# 것은 값이 작기 때문이며, 곱셈과 배율 alpha/r을 거치면서 ΔW가 커집니다. 셀은 ΔW의 특이값(singular value)도 출력하는데,
# 0이 아닌 값이 r개를 넘을 수 없습니다(위 셀이 흉내 낸 변화의 랭크가 2이므로 큰 값 두 개가 두드러집니다).
# 마지막으로 이 층을 `merge()`로 병합해도 출력이 같은지 확인합니다(모델 전체는 4.5절에서 확인합니다).
#
# **English** — The figure below draws `W0`, `B`, `A` and `ΔW = (alpha/r)·B·A` side by side on one colour scale (blue
# negative, red positive); the colour bar at the right end is that scale, its end labels ± the largest absolute value of
# all four matrices. `ΔW` is as large as `W0`, but as the product of a narrow `B` (r columns) and a flat `A` (r rows) it
# has a regular, striped pattern: every row is a combination of A's r rows. A and B look pale because their entries are
# small; the product and the scale alpha/r make ΔW larger. The cell also prints ΔW's singular values: no more than r of
# them can be non-zero (and since the change imitated above has rank 2, two large ones stand out). Last, it merges this
# layer with `merge()` and checks that the output is unchanged (the whole model follows in section 4.5).

# %%
delta = layer.delta_weight().detach()  # (d_out, d_in) = scale · B @ A
assert torch.allclose(delta, layer.scale * layer.lora_B.weight @ layer.lora_A.weight)
path = heatmaps({"W0 (frozen)": base.weight.tolist(), "B (d_out x r)": layer.lora_B.weight.tolist(),
                 "A (r x d_in)": layer.lora_A.weight.tolist(), "ΔW = (alpha/r)·B·A": delta.tolist()},
                _course.figure_path("04_lora_matrices.svg"), title=f"LoRA r={r}: W0, B, A and ΔW", cell=8)
_course.show_figure(path)

singular = torch.linalg.svdvals(delta)
print("singular values of ΔW:", [f"{s:.3g}" for s in singular[:r + 2].tolist()], "...")
print(f"rank of ΔW: {torch.linalg.matrix_rank(delta).item()} (r = {r}); rank of the true change: "
      f"{torch.linalg.matrix_rank(true_change).item()}")
print(f"relative error of ΔW against the true change: {(delta - true_change).norm() / true_change.norm():.2e}")
assert torch.linalg.matrix_rank(delta).item() <= r and singular[1] > 10 * singular[2]

x = torch.randn(16, d_in)
with torch.no_grad():
    before = layer(x)  # base(x) + scale · B(A(x))
    layer.merge()  # W0 ← W0 + ΔW; forward now uses the base alone
    after = layer(x)
    layer.unmerge()
print(f"small layer: max |merged - unmerged output| = {(after - before).abs().max():.1e}")
assert torch.allclose(after, before, atol=1e-5)

# %% [markdown]
# ## 4.3 랭크와 alpha · Rank and alpha
#
# **한국어** — `r`은 업데이트의 랭크, 즉 표현력과 학습 파라미터 수를 정합니다. `alpha`는 업데이트에 곱하는 상수의
# 분자이며, 실제 배율은 `scale = alpha / r`입니다. 논문(4.1절)에 따르면 r로 나누면 "alpha를 조정하는 것이 학습률을
# 조정하는 것과 비슷해지므로" r을 바꿀 때 다시 튜닝할 필요가 줄어듭니다. 흔한 선택은 alpha = 2r입니다.
#
# 그런데 r이 아주 크면 alpha/r이 업데이트를 지나치게 작게 만든다는 관찰이 있어, rsLoRA(Kalajdzievski 2023)는 r 대신
# √r로 나눕니다(`use_rslora=True`). 아래 셀은 alpha = 16으로 고정하고 r을 바꿔 가며, 같은 데이터에서 Adam으로 5스텝
# 학습한 뒤 ΔW의 크기(프로베니우스 노름)를 잽니다.
#
# **English** — `r` is the rank of the update: its expressiveness and its trainable parameter count. `alpha` is the
# numerator of the update's multiplier, `scale = alpha / r`. The paper (section 4.1) explains that dividing by r
# makes "tuning alpha roughly like tuning the learning rate", so r can change with less retuning. A common choice
# is alpha = 2r.
#
# For very large r, though, alpha/r makes the update too small; rsLoRA (Kalajdzievski 2023) divides by √r instead
# (`use_rslora=True`). The cell below fixes alpha = 16, varies r, trains 5 Adam steps on the same data and measures
# the size (Frobenius norm) of ΔW.


# %%
def update_norm(r: int, use_rslora: bool, d: int = 256, steps: int = 5) -> tuple[float, float]:
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(d, d, bias=False), r=r, alpha=16, use_rslora=use_rslora)
    opt = torch.optim.Adam([lora.lora_A.weight, lora.lora_B.weight], lr=1e-3)
    x, y = torch.randn(64, d), torch.randn(64, d)
    for _ in range(steps):
        loss = (lora(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lora.scale, lora.delta_weight().norm().item()


ranks = (2, 8, 32, 128)
print(f"{'r':>5}{'alpha/r':>10}{'|ΔW|':>10}{'alpha/√r':>12}{'|ΔW| rsLoRA':>14}")
norms = {False: [], True: []}
for rank in ranks:
    row = f"{rank:>5}"
    for rs in (False, True):
        scale, norm = update_norm(rank, rs)
        norms[rs].append(norm)
        row += f"{scale:>10.3g}{norm:>10.3f}" if not rs else f"{scale:>12.3g}{norm:>14.3f}"
    print(row)
print(f"largest/smallest |ΔW|: alpha/r {max(norms[False]) / min(norms[False]):.1f}×, "
      f"alpha/√r {max(norms[True]) / min(norms[True]):.1f}×")
assert norms[False][-1] < norms[False][0]  # with alpha/r, larger ranks take smaller first steps

# %% [markdown]
# **한국어** — 위 표에서 alpha/r 배율은 r이 커질수록 ΔW를 작게 만들고, alpha/√r은 r과 상관없이 비슷한 크기를
# 유지합니다(마지막 줄의 비율을 비교해 보세요). r = 8–16 정도의 보통 설정에서는 어느 쪽이든 잘 동작합니다.
#
# **English** — In the table, the alpha/r scale makes ΔW smaller as r grows, while alpha/√r keeps it about the
# same size whatever r is (compare the ratios on the last line). At ordinary settings (r = 8–16) either works.

# %% [markdown]
# ## 4.4 기본 모델에 LoRA 붙이기 · LoRA on the default model
#
# **한국어** — `apply_lora`는 모델 전체를 얼리고, 이름이 맞는 선형층을 `LoRALinear`로 바꿔 끼웁니다. 원 논문처럼
# `q_proj`, `v_proj`에만 붙일 수도 있고, `"all-linear"`로 블록의 모든 선형층(어휘 출력층 제외)에 붙일 수도
# 있습니다. 아래 셀은 두 경우에 minilora가 출력하는 학습 파라미터 수(PEFT의 `print_trainable_parameters`와 같은
# 형식)를 보여 주고, 감싼 층마다 r·(d_in + d_out)을 더한 값과 같은지 확인합니다.
#
# **English** — `apply_lora` freezes the whole model and swaps each linear whose name matches for a `LoRALinear`:
# only `q_proj` and `v_proj` as in the paper, or every linear of the blocks (except the vocabulary head) with
# `"all-linear"`. The cell prints minilora's trainable-parameter summary for both (the format of PEFT's
# `print_trainable_parameters`) and checks it against the sum of r·(d_in + d_out) over the wrapped layers.

# %%
model_dir = _course.default_model()
for targets in (("q_proj", "v_proj"), "all-linear"):
    m = load_model(model_dir)
    names = apply_lora(m, r=8, alpha=16, targets=targets)
    wrapped = [mod for mod in m.modules() if isinstance(mod, LoRALinear)]
    expected = sum(8 * (mod.in_features + mod.out_features) for mod in wrapped)
    print(f"targets={targets!r}: {len(names)} layers wrapped, e.g. {names[:2]}")
    print("   ", parameter_summary(m))
    assert count_parameters(m)[0] == expected
print("\none attention block after apply_lora:\n", m.model.layers[0].self_attn)

# %% [markdown]
# ### 허깅페이스 PEFT에서는 · The same with Hugging Face PEFT
#
# **한국어** — PEFT로 같은 일을 하면 다음과 같습니다. `r`, `lora_alpha`, `target_modules`가 minilora의 `r`, `alpha`,
# `targets`에 해당하며, 어댑터 파일의 형식도 같습니다(9장).
#
# ```python
# from peft import LoraConfig, get_peft_model
# config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
#                     task_type="CAUSAL_LM")
# peft_model = get_peft_model(hf_model, config)
# peft_model.print_trainable_parameters()
# ```
#
# `transformers`와 `peft`가 설치되어 있으면 아래 셀이 같은 기본 모델에 두 라이브러리로 LoRA를 붙여 학습 파라미터
# 수를 비교하고, PEFT 어댑터(B를 무작위로 채운 것)를 저장해 minilora로 불러온 뒤 두 모델의 출력이 같은지 잽니다.
#
# **English** — With PEFT the same step reads as below; `r`, `lora_alpha` and `target_modules` are minilora's `r`,
# `alpha` and `targets`, and the adapter files have the same format (chapter 9).
#
# ```python
# from peft import LoraConfig, get_peft_model
# config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
#                     task_type="CAUSAL_LM")
# peft_model = get_peft_model(hf_model, config)
# peft_model.print_trainable_parameters()
# ```
#
# When `transformers` and `peft` are installed, the cell below puts LoRA on the same default model with both
# libraries and compares the trainable counts, then saves a PEFT adapter (B filled at random), loads it into
# minilora and measures how far the two models' outputs are apart.

# %%
if _course.has("transformers", "peft"):
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from minilora.adapter import load_adapter

    for targets in (["q_proj", "v_proj"], "all-linear"):
        torch.manual_seed(0)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                    LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                                               task_type="CAUSAL_LM"))
        m = load_model(model_dir)
        apply_lora(m, r=8, alpha=16, targets=targets)
        peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        print(f"targets={targets!r}: trainable PEFT {peft_trainable:,}, minilora {count_parameters(m)[0]:,}")
        assert peft_trainable == count_parameters(m)[0]
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # a "trained" adapter, so that the comparison means something
    ids = torch.tensor([load_tokenizer(model_dir).encode("Haneul Tea Garden is on")])  # (1, T)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        ours = load_model(model_dir)
        load_adapter(ours, folder)
        with torch.no_grad():
            gap = (peft_model.eval()(ids).logits - ours.eval()(ids)).abs().max().item()
            effect = (ours(ids) - load_model(model_dir).eval()(ids)).abs().max().item()
    print(f"PEFT adapter loaded into minilora: max |logits difference| = {gap:.1e} "
          f"(the adapter itself moves the logits by up to {effect:.2f})")
    assert gap < 1e-4 and effect > 1e-3
else:
    print("transformers/peft are not installed: the side-by-side comparison is skipped")

# %% [markdown]
# ## 4.5 병합해도 출력은 그대로 · Merging changes nothing
#
# **한국어** — 병합을 의미 있게 시험하려면 B가 0이 아니어야 하므로, 먼저 기본 모델(all-linear, r = 8)을 도메인
# 글로 몇 스텝 학습합니다. 그다음 같은 입력에 대해 출력(logits)을 세 번 비교합니다.
#
# 1. 층마다 `merge()`: `W0 ← W0 + ΔW`로 가중치에 더하며, 이후 순전파는 LoRA 경로를 건너뜁니다.
# 2. `unmerge()`: `W0 ← W0 − ΔW`로 되돌립니다.
# 3. `merge_lora(model)`: 모든 `LoRALinear`를 병합된 보통의 `nn.Linear`로 바꿉니다. 배포(9장)에 쓰는 방법입니다.
#
# 세 경우 모두 출력의 최대 차이는 로짓 크기에 비례하는 float32 반올림 수준이어야 합니다(셀은 가장 큰 로짓의
# 크기도 출력합니다).
#
# **English** — To test merging meaningfully B must be non-zero, so first train the default model (all-linear,
# r = 8) on domain text for a few steps. Then compare the outputs (logits) on the same input three times:
#
# 1. `merge()` on every layer: `W0 ← W0 + ΔW`, and forward then skips the LoRA path;
# 2. `unmerge()`: `W0 ← W0 − ΔW` back;
# 3. `merge_lora(model)`: every `LoRALinear` becomes an ordinary merged `nn.Linear` — the way to deploy (chapter 9).
#
# In every case the largest difference of the outputs must be at float32 rounding level for logits of their size
# (the cell prints the largest logit too).

# %%
tokenizer = load_tokenizer(model_dir)
blocks, val_blocks = load_base_data(_course.default_data("domain.txt"), tokenizer, block_size=128)
base_model = load_model(model_dir)  # kept untouched, for comparison
model = load_model(model_dir)
apply_lora(model, r=8, alpha=16, targets="all-linear")
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
n_steps, batch_size = _course.steps(20, 3), 4
for step in range(n_steps):
    batch = pad_collate([blocks[(step * batch_size + i) % len(blocks)] for i in range(batch_size)], pad_id(tokenizer))
    loss, _ = next_token_loss(model(batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 5 == 0 or step == n_steps - 1:
        print(f"step {step:>3}  training loss {loss.item():.4f}")
model.eval()

lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
largest_b = max(m.lora_B.weight.abs().max().item() for m in lora_layers)
print(f"largest |B| entry after training: {largest_b:.3g} (it started at 0)")
assert largest_b > 0

# %%
ids = pad_collate(val_blocks[:2], pad_id(tokenizer))
with torch.no_grad():
    reference = model(ids["input_ids"], attention_mask=ids["attention_mask"])  # (B, T, V), unmerged

    for m in lora_layers:
        m.merge()
    merged = model(ids["input_ids"], attention_mask=ids["attention_mask"])
    for m in lora_layers:
        m.unmerge()
    unmerged = model(ids["input_ids"], attention_mask=ids["attention_mask"])
    merge_lora(model)  # LoRALinear → plain nn.Linear holding W0 + ΔW
    exported = model(ids["input_ids"], attention_mask=ids["attention_mask"])

    base_logits = base_model(ids["input_ids"], attention_mask=ids["attention_mask"])
effect = (reference - base_logits).abs().max()
print(f"largest |logit|: {reference.abs().max().item():.3g}; how much LoRA changed the logits (vs. the base model): "
      f"{effect.item():.3e}")
scale = reference.abs().max().item()
for label, out in (("merge()", merged), ("unmerge()", unmerged), ("merge_lora(model)", exported)):
    diff = (out - reference).abs().max().item()
    print(f"max |logits - unmerged logits| after {label:18}: {diff:.3e} ({diff / scale:.1e} of the largest logit)")
    # float32 keeps ~7 significant digits; four blocks of rounding stay far below 1e-5 of the logits' size
    assert diff <= 1e-5 * scale
left = sum(isinstance(m, LoRALinear) for m in model.modules())
print(f"LoRALinear modules left after merge_lora: {left}; parameters: {count_parameters(model)[1]:,} "
      f"(base model: {count_parameters(base_model)[1]:,})")
assert left == 0 and count_parameters(model)[1] == count_parameters(base_model)[1]

# %% [markdown]
# **한국어** — 위 출력에서 LoRA 학습이 로짓을 바꾼 크기와 병합한 뒤의 차이를 비교해 보세요. 병합한 모델의 차이는
# float32 반올림 수준으로 아주 작고, 병합한 모델은 원래 모델과 파라미터 수가 같습니다. 즉 LoRA로 학습한 모델은
# 추론할 때 원래 모델과 똑같은 크기·속도로 돌릴 수 있습니다. 반대로 병합하지 않고 어댑터(A와 B)만 따로 저장하면,
# 작은 파일 하나로 작업마다 어댑터를 갈아 끼울 수 있습니다(9장).
#
# **English** — Compare how much LoRA training changed the logits with the differences after merging: the merged
# model differs only at float32 rounding level and has exactly the base model's parameter count, so a LoRA-trained
# model runs at the original size and speed. Kept unmerged instead, the adapter (A and B) is a small file that can
# be swapped per task (chapter 9).

# %% [markdown]
# ## 4.6 크기와 방향: DoRA · Magnitude and direction: DoRA
#
# **한국어** — 가중치 행렬의 각 행(출력 특징 하나)은 **크기**(행의 L2 노름)와 **방향**(길이 1인 행 벡터)의 곱입니다:
# `W0 = m0 · V`, `m0 = ‖W0‖`(행마다), `V = W0 / ‖W0‖`. DoRA(Liu et al. 2024)는 방향을 LoRA로, 크기를 직접 학습합니다.
#
# $$W' = m \cdot \frac{W_0 + sBA}{\lVert W_0 + sBA \rVert}, \qquad s = \alpha / r$$
#
#     m: (d_out,) 학습, 처음에는 ‖W0‖
#
# B = 0에서 시작하면 `W' = W0`이므로 첫 스텝은 LoRA처럼 원래 모델 그대로입니다. 논문(4.3절)은 역전파에서
# 노름 `‖W0 + s·B·A‖`을 상수로 취급(detach)하라고 권합니다. 그러면 (d_out × d_in) 행렬의 노름을 거쳐 기울기를 보낼
# 필요가 없어 메모리를 아낄 수 있고, 논문의 측정에서 정확도는 떨어지지 않았습니다. minilora의
# `DoRALinear`(`minilora/dora.py`)는 `LoRALinear`에 `lora_magnitude_vector`(PEFT와 같은 이름) 하나를 더한
# 층입니다. 아래 셀은 기본 모델의 실제 가중치 하나를 크기와 방향으로 나누고 다시 곱하면 원래대로 돌아오는지
# 확인하고, 행 노름의 분포를 히스토그램으로 그립니다(세로축: 그 구간에 든 행의 수).
#
# 히스토그램의 봉우리가 둘인 것은 RoPE 때문입니다. `q_proj`의 각 헤드에서 행 i와 행 i + head_dim/2는 RoPE가 함께
# 회전시키는 한 쌍이고, 작은 i일수록 빨리 회전합니다(`minilora/rope.py`). 아래 셀은 회전 속도(쌍 i)별 평균 행 노름을
# 출력합니다. 학습된 기본 모델에서는 빨리 회전하는 앞쪽 쌍의 행 노름이 뒤쪽 쌍보다 크고, RoPE를 거치지 않는
# `v_proj`에는 이런 차이가 없습니다. 두 봉우리는 이 두 무리의 행입니다.
#
# **English** — Each row of a weight matrix (one output feature) is a **magnitude** (the row's L2 norm) times a
# **direction** (a row vector of length 1): `W0 = m0 · V` with `m0 = ‖W0‖` per row and `V = W0 / ‖W0‖`. DoRA
# (Liu et al. 2024) learns the direction with LoRA and the magnitude directly:
#
# $$W' = m \cdot \frac{W_0 + sBA}{\lVert W_0 + sBA \rVert}, \qquad s = \alpha / r$$
#
#     m: (d_out,) trained, starting at ‖W0‖
#
# Starting from B = 0 gives `W' = W0`, so step 0 is the original model, as with LoRA. The paper (§4.3) treats the
# norm `‖W0 + s·B·A‖` as a constant in backward (detached): no gradient then has to flow through the norm of a
# (d_out × d_in) matrix, which saves memory, and it measured no loss of accuracy. minilora's `DoRALinear`
# (`minilora/dora.py`) is a `LoRALinear` with one more parameter, `lora_magnitude_vector` (PEFT's name). The cell
# below splits a real weight of the default model into magnitude and direction, checks that their product gives
# it back, and plots the distribution of the row norms as a histogram (y axis: rows per bin).
#
# The histogram has two humps because of RoPE. In each head of `q_proj`, rows i and i + head_dim/2 are a pair
# that RoPE rotates together, and the smaller i, the faster the pair turns (`minilora/rope.py`). The cell prints
# the mean row norm per pair i: in the trained default model the fast-turning pairs at the front have larger row
# norms than those at the back, while `v_proj`, which RoPE never touches, shows no such split. The two humps are
# these two groups of rows.

# %%
from minilora.dora import DoRALinear  # noqa: E402  (introduced here, with its section)
from minilora.plot import histogram  # noqa: E402

W0 = base_model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach()  # (d_out, d_in) of a real, pre-trained layer
m0 = W0.norm(dim=1)  # (d_out,): the magnitude of each row
V = W0 / m0[:, None]  # (d_out, d_in): the direction, every row of length 1
assert torch.allclose(V.norm(dim=1), torch.ones_like(m0), atol=1e-5) and torch.allclose(m0[:, None] * V, W0, atol=1e-6)
print(f"layers.0.self_attn.q_proj: W0 {tuple(W0.shape)}; row norms m0 from {m0.min():.3f} to {m0.max():.3f} "
      f"(mean {m0.mean():.3f}); m0 · V == W0")
_course.show_figure(histogram(m0.tolist(), _course.figure_path("04_dora_magnitudes.svg"), bins=24,
                              title="Row norms (magnitudes) of layers.0.self_attn.q_proj", xlabel="‖row‖"))
# The two humps: RoPE turns rows i and i + head_dim/2 of each head as one pair, pair 0 fastest ("rotate_half").
head_dim = base_model.config.head_dim
v_norms = base_model.get_submodule("model.layers.0.self_attn.v_proj").weight.detach().norm(dim=1)  # (d_out_v,)
by_pair = {name: norms.view(-1, 2, head_dim // 2).mean(dim=(0, 1))  # (head_dim/2,): mean row norm per RoPE pair i
           for name, norms in (("q_proj", m0), ("v_proj (no RoPE)", v_norms))}
for name, norms in by_pair.items():
    print(f"{name:17} mean row norm per pair i = 0 (fastest) .. {head_dim // 2 - 1}:",
          " ".join(f"{v:.2f}" for v in norms.tolist()))
fast_over_slow = {name: (n[:4].mean() / n[-4:].mean()).item() for name, n in by_pair.items()}
print("fastest 4 pairs / slowest 4 pairs:", {name: round(v, 2) for name, v in fast_over_slow.items()})
if _course.default_model_is_pretrained(model_dir):  # (not the few-step stand-in a test run may build)
    assert fast_over_slow["q_proj"] > 1.5 > fast_over_slow["v_proj (no RoPE)"]
dora_layer = DoRALinear(base_model.get_submodule("model.layers.0.self_attn.q_proj"), r=4, alpha=8)
assert torch.allclose(dora_layer.lora_magnitude_vector, m0)  # m starts at ‖W0‖
print(f"DoRALinear adds {dora_layer.lora_magnitude_vector.numel()} trainable magnitudes to LoRA's "
      f"{dora_layer.lora_A.weight.numel() + dora_layer.lora_B.weight.numel()} A and B entries")

# %% [markdown]
# **한국어** — 이제 4.1절의 작은 문제(W0에 랭크 2의 변화를 더한 층 흉내 내기)를 같은 시드에서 LoRA와 DoRA로 풀어 봅니다.
# 셀은 두 손실 곡선을 그리고, 학습 뒤 크기가 얼마나 변했는지(ΔM: 행 노름 변화의 평균)와 방향이 얼마나 변했는지
# (ΔD: 행마다 1 − cos(W', W0)의 평균)를 출력합니다. DoRA 논문은 LoRA에서 ΔM과 ΔD가 함께 움직이는 반면, 전체
# 파인튜닝과 DoRA는 둘을 따로 움직일 수 있다는 점을 관찰했습니다. 이 작은 예에서 두 방법이 얼마나 다른지는 셀이
# 계산한 값을 보세요(어느 쪽이 앞서도 이상하지 않습니다. 목표가 저랭크 변화라서 LoRA에도 쉬운 문제입니다). 이
# 예에서 DoRA가 더 느리게 수렴한다면, 노름을 상수로 취급한 기울기가 손실의 정확한 기울기가 아니기 때문입니다. 목표
# 자체는 DoRA로도 정확히 표현할 수 있으므로(V = 목표, m = ‖목표‖) 손실 0이 두 방법 모두의 고정점인 것은 같습니다.
# 범례는 그림 오른쪽, 그래프 밖에 있습니다.
#
# **English** — Now solve section 4.1's small problem (imitating W0 plus a rank-2 change) with LoRA and with DoRA
# from the same seed. The cell plots both loss curves and prints, after training, how much the magnitude changed
# (ΔM: the mean change of the row norms) and how much the direction changed (ΔD: the mean over rows of
# 1 − cos(W', W0)). The DoRA paper observed that under LoRA ΔM and ΔD move together, while full fine-tuning and DoRA
# can move them separately. How different the two methods are on this small example is whatever the cell computes
# (either order is plausible: the target is a low-rank change, an easy problem for LoRA too). Where DoRA converges
# more slowly here, the reason is that the gradient with the norm held constant is not the loss's exact gradient;
# the target itself is exactly reachable by DoRA too (V = target, m = ‖target‖), so zero loss is a fixed point of
# both.

# %%
def fit(layer, steps):
    """Train `layer`'s adapter parameters to imitate `target` (section 4.1); return the loss curve."""
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)  # both methods see the same inputs
    losses = []
    for step in range(steps):
        x = torch.randn(64, d_in, generator=gen)  # (N, d_in)
        loss = (layer(x) - x @ target.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((step, loss.item()))
    return losses


def magnitude_and_direction_change(layer):
    with torch.no_grad():
        w = layer.merged_weight(base.weight)  # W' in float32, (d_out, d_in)
    dm = (w.norm(dim=1) - base.weight.norm(dim=1)).abs().mean().item()
    dd = (1 - torch.nn.functional.cosine_similarity(w, base.weight, dim=1)).mean().item()
    return dm, dd


curves = {}
for name, cls in (("LoRA", LoRALinear), ("DoRA", DoRALinear)):
    torch.manual_seed(1)  # the same A for both
    toy = cls(base, r=r, alpha=alpha)
    curves[name] = fit(toy, _course.steps(300, 100))
    dm, dd = magnitude_and_direction_change(toy)
    print(f"{name}: loss {curves[name][0][1]:.4f} → {curves[name][-1][1]:.5f};  ΔM {dm:.4f}  ΔD {dd:.5f}")
    assert curves[name][-1][1] < curves[name][0][1] / 4  # both learn (how fast: printed above)
    x = torch.randn(8, d_in)
    with torch.no_grad():
        unmerged = toy(x)
        toy.merge()  # W0 ← W' (for DoRA: m · (W0 + s·BA) / ‖W0 + s·BA‖)
        assert torch.allclose(toy(x), unmerged, atol=1e-5)
        toy.unmerge()
_course.show_figure(line_chart(curves, _course.figure_path("04_dora_vs_lora_loss.svg"),
                               title="The toy layer trained with LoRA and with DoRA", log_y=True))

# %% [markdown]
# **한국어** — DoRA는 순전파 때마다 감싼 층 각각의 노름 `‖W0 + s·B·A‖`을 계산하므로 한 스텝이 LoRA보다 느립니다. 같은
# 모델과 데이터에서 잰 검증 손실·스텝당 시간·메모리는 `benchmarks/bench_dora_vs_lora.py`의 결과 파일에 있습니다.
# 학습은 `python -m minilora.train --method dora`(4비트 베이스 모델이면 `--method qdora`)로 하며, 저장된 어댑터는
# PEFT에서 `use_dora=True` 어댑터로 그대로 읽힙니다.
#
# **English** — DoRA computes the norm `‖W0 + s·B·A‖` of every adapted layer on every forward, so a step is slower
# than LoRA's. Validation loss, time per step and memory measured on the same model and data are in the results of
# `benchmarks/bench_dora_vs_lora.py`. Train with `python -m minilora.train --method dora` (`--method qdora` on a
# 4-bit base); the saved adapter loads in PEFT as a `use_dora=True` adapter.
#
# ## 정리 · Summary
#
# **한국어**
# - LoRA는 `W0`를 얼리고 `ΔW = (alpha/r)·B·A`만 학습합니다. 학습 파라미터는 층마다 r·(d_in + d_out)개입니다.
# - `B = 0`에서 시작하므로 학습 전의 모델은 원래 모델과 같고, 학습된 ΔW의 랭크는 r을 넘지 않습니다.
# - `scale = alpha/r`(rsLoRA는 alpha/√r)이 업데이트의 크기를 정합니다.
# - `merge()`/`merge_lora`로 병합한 모델은 병합하기 전과 같은 출력을 냅니다.
# - DoRA는 W'을 크기 m(직접 학습)과 방향(LoRA로 학습)으로 나눕니다: `DoRALinear`.
#
# **English**
# - LoRA freezes `W0` and trains only `ΔW = (alpha/r)·B·A`: r·(d_in + d_out) parameters per layer.
# - Starting from `B = 0`, the untrained model is the original; the trained ΔW has rank at most r.
# - `scale = alpha/r` (alpha/√r with rsLoRA) sets the size of the update.
# - A model merged with `merge()`/`merge_lora` gives the same outputs as before merging.
# - DoRA splits W' into a magnitude m (trained directly) and a direction (trained with LoRA): `DoRALinear`.

# %% [markdown]
# ## 연습 문제 · Exercises
#
# **한국어** — 함수를 채우고 셀을 다시 실행하세요(풀이: `tutorials/solutions/04_lora.py`).
#
# 1. **LoRA의 순전파.** `lora_forward(x, W0, A, B, alpha, r)`: 행 벡터 `x`에 대해 `y = x·W0ᵀ + (alpha/r)·x·Aᵀ·Bᵀ`를
#    계산하세요. "A가 압축하고(d_in → r) B가 펼칩니다(r → d_out)".
# 2. **초기화.** `init_lora(d_in, d_out, r)`: `(A, B)`를 만드세요. 검사는 첫 스텝의 모델이 원래 모델과 같은지(B = 0),
#    그리고 B가 실제로 기울기를 받는지 봅니다. A도 0이면 어떻게 되는지 먼저 예측해 보세요.
# 3. **병합.** `merged_weight(W0, A, B, alpha, r)`: `merge_lora`가 써 넣는 가중치를 계산하세요.
#
# **English** — Fill in the functions and run the cell again (solutions: `tutorials/solutions/04_lora.py`).
#
# 1. **LoRA's forward.** `lora_forward(x, W0, A, B, alpha, r)`: for row vectors `x`,
#    `y = x·W0ᵀ + (alpha/r)·x·Aᵀ·Bᵀ` — "A compresses (d_in → r), B expands (r → d_out)".
# 2. **Initialisation.** `init_lora(d_in, d_out, r)`: make `(A, B)`. The check tests that the model at step 0 is the
#    original one (B = 0) and that B really gets a gradient. Predict first what happens if A is zero too.
# 3. **Merging.** `merged_weight(W0, A, B, alpha, r)`: the weight `merge_lora` writes.

# %%
import _exercises  # noqa: E402  (the checks; tutorials/_exercises.py)

def lora_forward(x, W0, A, B, alpha, r):
    raise NotImplementedError  # your code here


def init_lora(d_in: int, d_out: int, r: int):
    raise NotImplementedError  # your code here


def merged_weight(W0, A, B, alpha, r):
    raise NotImplementedError  # your code here


_exercises.try_it(_exercises.EXERCISES["4.1"], lora_forward)
_exercises.try_it(_exercises.EXERCISES["4.2"], init_lora)
_exercises.try_it(_exercises.EXERCISES["4.3"], merged_weight)
