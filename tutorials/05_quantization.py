# %% [markdown]
# # 5. 양자화 · Quantization
#
# **한국어** — 2장에서 LoRA로 학습할 때 남는 가장 큰 메모리는 **얼린 가중치 자체**였습니다. QLoRA(Dettmers et al.
# 2023)는 이 가중치를 **4비트**로 저장합니다. 16비트에서 4비트로 가면 메모리가 약 4분의 1이 되지만, 숫자 하나가
# 가질 수 있는 값은 16가지뿐입니다. 이 장에서는 그 16개의 값을 어떻게 고르는지(NF4 코드), 가중치를 어떻게 그
# 값들에 맞추는지(블록별 absmax), 블록마다의 스케일을 어떻게 한 번 더 줄이는지(이중 양자화)를 `minilora/nf4.py`로
# 직접 따라가고, 오차와 메모리를 실제로 잽니다.
#
# **English** — In chapter 2 the largest memory left when training with LoRA was **the frozen weights
# themselves**. QLoRA (Dettmers et al. 2023) stores them in **4 bits**: from 16 bits that is about a quarter of the
# memory, but a number can now take only 16 values. This chapter follows, with `minilora/nf4.py`, how those 16
# values are chosen (the NF4 code), how a weight is fitted onto them (blockwise absmax) and how the scales are
# shrunk once more (double quantization), and it measures the error and the memory.

# %%
import torch

import _course
from minilora.formats.safetensors_folder import load_model
from minilora.lora import apply_lora, count_parameters
from minilora.quant.nf4 import NF4_CODE, dequantize_absmax, dequantize_nf4, quantize_nf4
from minilora.plot import histogram

torch.manual_seed(0)
GiB = 2**30

# %% [markdown]
# ## 5.1 비트 · Bits
#
# **한국어** — 부동소수점 수는 부호(sign), 지수(exponent), 가수(mantissa) 비트로 이루어집니다. fp32는 1 + 8 + 23
# 비트, bf16은 지수는 fp32와 같고 가수만 7비트로 줄인 1 + 8 + 7비트, fp16은 1 + 5 + 10비트입니다. 가수 비트가
# 적을수록 가까운 수를 구별하지 못하고(아래 `eps`: 1 다음으로 표현되는 수와의 간격), 지수 비트가 적을수록 표현할
# 수 있는 범위(`max`)가 좁아집니다. 아래 셀은 각 형식의 이 값들과, 0.1을 저장했을 때의 반올림 오차, 그리고 fp32와
# bf16으로 저장된 0.1의 실제 비트를 출력합니다. bf16은 부호와 지수 비트를 그대로 두고 가수만 7비트로 반올림합니다.
#
# **English** — A floating-point number is sign, exponent and mantissa bits: fp32 has 1 + 8 + 23, bf16 keeps fp32's
# exponent and cuts the mantissa to 7 (1 + 8 + 7), fp16 has 1 + 5 + 10. Fewer mantissa bits tell nearby numbers
# apart less well (`eps` below: the gap between 1 and the next number); fewer exponent bits narrow the range
# (`max`). The cell prints these for each format, the rounding error of storing 0.1, and the actual bits of 0.1 in
# fp32 and bf16: bf16 keeps the sign and exponent bits and rounds the mantissa to 7 bits.

# %%
print(f"{'dtype':10}{'bits':>5}{'eps':>12}{'max':>12}{'0.1 stored as':>22}{'error':>11}")
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    info = torch.finfo(dtype)
    stored = torch.tensor(0.1, dtype=torch.float64).to(dtype)
    print(f"{str(dtype).removeprefix('torch.'):10}{info.bits:>5}{info.eps:>12.3g}{info.max:>12.3g}"
          f"{stored.double().item():>22.17f}{abs(stored.double().item() - 0.1):>11.2g}")

bits32 = f"{torch.tensor(0.1).view(torch.int32).item() & 0xFFFFFFFF:032b}"
bits16 = f"{torch.tensor(0.1).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF:016b}"
print(f"\n0.1 in fp32: {bits32[0]} {bits32[1:9]} {bits32[9:]}   (sign exponent mantissa)")
print(f"0.1 in bf16: {bits16[0]} {bits16[1:9]} {bits16[9:]}")
# bf16 keeps fp32's sign and exponent and rounds the mantissa to its first 7 bits (round to nearest: here the
# dropped bits 1100... are more than half a step, so the last kept bit rounds up from 0 to 1)
assert bits16[:9] == bits32[:9] and int(bits16[9:], 2) == round(int(bits32[9:], 2) / 2**16)
print(f"\nvalues a 4-bit number can take: 2**4 = {2**4}; a 16-bit one: 2**16 = {2**16:,}")

# %% [markdown]
# ## 5.2 NF4 코드: 어떤 16개의 값인가 · The NF4 code: which 16 values?
#
# **한국어** — 4비트로는 16개의 값만 쓸 수 있습니다. 가장 단순한 선택은 -1부터 1까지 **같은 간격**의 16개입니다.
# 하지만 학습된 신경망의 가중치는 대체로 0 근처에 몰린 **정규분포** 모양이라서, 같은 간격의 코드는 값이 거의 없는
# 양 끝에 코드 값을 낭비합니다. **NF4(4-bit NormalFloat)** 는 정규분포 N(0, 1)의 **분위수(quantile)** 에 코드 값을
# 둡니다. 그러면 각 코드 값이 맡는 값의 수가 고르게 되고, 값이 많은 0 근처에서는 코드 값이 촘촘해집니다. 또 0을
# 정확히 표현하도록 음수 쪽에 7개, 0, 양수 쪽에 8개를 두고, 양 끝이 ±1이 되도록 나눕니다.
#
# 아래 셀은 minilora가 쓰는 `NF4_CODE`(bitsandbytes와 같은 16개의 fp32 값)를 출력하고, 정규분포의 분위수로부터
# 이 값을 다시 계산해 같은지 확인합니다.
#
# **English** — 4 bits name only 16 values. The simplest choice is 16 **evenly spaced** values from -1 to 1. But
# the weights of a trained network are roughly **normally distributed**, bunched around 0, so an even grid wastes
# levels at the ends where hardly any value lives. **NF4 (4-bit NormalFloat)** puts its levels at **quantiles** of
# the normal distribution N(0, 1): each level then covers about the same number of values, and the crowded region
# near 0 gets dense levels. To represent 0 exactly it uses 7 negative levels, 0, and 8 positive ones, scaled so the
# extremes are ±1.
#
# The cell prints the `NF4_CODE` minilora uses (the same 16 fp32 numbers as bitsandbytes) and recomputes it from
# normal quantiles to check.

# %%
print("NF4_CODE:", [f"{v:+.4f}" for v in NF4_CODE.tolist()])

normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
# The outermost quantile cannot be 1.0 (its quantile is infinite): QLoRA takes the midpoint of 1 - 1/(2·15) and
# 1 - 1/(2·16), the "half a step" offsets of a 15- and a 16-level grid.
offset = ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))) / 2
positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 levels > 0
negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels < 0
rebuilt = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
rebuilt = rebuilt / rebuilt.max()
print(f"rebuilt from N(0,1) quantiles (offset {offset:.7f}): "
      f"max difference {(rebuilt.float() - NF4_CODE).abs().max():.1e}")
assert torch.allclose(rebuilt.float(), NF4_CODE, atol=1e-6)

UNIFORM_CODE = torch.linspace(-1, 1, 16)  # the evenly spaced alternative, for comparison
print("uniform :", [f"{v:+.4f}" for v in UNIFORM_CODE.tolist()])

# %% [markdown]
# ## 5.3 블록별 absmax · Blockwise absmax
#
# **한국어** — 코드의 값은 [-1, 1] 안에 있으므로, 가중치를 먼저 그 범위로 **정규화**해야 합니다. 가중치 전체의 최대
# 절댓값(absmax) 하나로 나누면, 큰 이상치(outlier) 하나 때문에 나머지 모든 값이 0 근처로 짓눌립니다. 그래서 QLoRA는
# 가중치를 순서대로 **64개씩 블록**으로 나누고 블록마다 자기 absmax로 나눕니다. 이상치의 피해는 그 블록 하나에
# 그칩니다. 저장하는 것은 각 값의 4비트 코드 번호와 블록마다의 absmax(fp32 스케일)입니다.
#
# 아래 셀은 N(0, 1)에서 뽑은 값을 블록별 absmax로 나눈 분포를 히스토그램으로 그리고(세로축: 구간마다 든 값의 수),
# NF4의 코드 값 16개를 빨간 세로선으로 표시합니다. 또 각 코드 값이 전체 값의 몇 퍼센트를 맡는지 NF4와 같은 간격
# 코드에 대해 출력합니다.
#
# **English** — The code lives in [-1, 1], so a weight must first be **normalised** into that range. Dividing the
# whole weight by one absolute maximum (absmax) lets a single outlier squash every other value towards 0. So QLoRA
# cuts the weight, in order, into **blocks of 64** and divides each block by its own absmax: an outlier only hurts
# its block. Stored are each value's 4-bit code index and one fp32 absmax per block.
#
# The cell below draws the histogram of N(0, 1) samples divided by their block's absmax (y axis: values per bin),
# with the 16 NF4 levels as red vertical lines, and prints the share of values each level takes, for NF4 and for
# the evenly spaced code.


# %%
def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the code value nearest to each scaled value (scaled in [-1, 1])."""
    return (scaled[..., None] - code).abs().argmin(dim=-1)


def fake_quantize(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Quantize w blockwise to `code` and back (the whole algorithm, without the bit packing)."""
    blocks = w.reshape(-1, blocksize).float()  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    scaled = blocks * (1.0 / absmax)  # in [-1, 1]
    return (code[nearest_code(scaled, code)] * absmax).reshape(w.shape)


samples = torch.randn(1024, 64)  # 1024 blocks of 64
normalised = samples / samples.abs().amax(dim=1, keepdim=True)  # each block divided by its absmax
path = histogram(normalised.flatten().tolist(), _course.figure_path("05_nf4_code_vs_normal.svg"), bins=80,
                 marks=NF4_CODE.tolist(), title="N(0,1) samples / block absmax, with the 16 NF4 levels",
                 xlabel="value / absmax of its block of 64")
_course.show_figure(path)

share_nf4 = torch.bincount(nearest_code(normalised.flatten(), NF4_CODE), minlength=16) / normalised.numel()
share_uniform = torch.bincount(nearest_code(normalised.flatten(), UNIFORM_CODE), minlength=16) / normalised.numel()
print(f"{'level':>6}{'NF4 value':>11}{'share':>8}   {'uniform value':>14}{'share':>8}")
for i in range(16):
    print(f"{i:>6}{NF4_CODE[i]:>+11.4f}{share_nf4[i]:>8.1%}   {UNIFORM_CODE[i]:>+14.4f}{share_uniform[i]:>8.1%}")


def entropy_bits(share: torch.Tensor) -> float:
    """Information the 4-bit indices actually carry: 4 bits only if all 16 levels are used equally often."""
    p = share[share > 0]
    return -(p * p.log2()).sum().item()


print(f"bits of information used (at most 4): NF4 {entropy_bits(share_nf4):.3f}, "
      f"uniform {entropy_bits(share_uniform):.3f}")
print(f"std of the normalised values {normalised.std():.3f}; the std NF4's levels assume "
      f"{1 / normal.icdf(torch.tensor(offset, dtype=torch.float64)).item():.3f}")
assert entropy_bits(share_nf4) > entropy_bits(share_uniform)

# %% [markdown]
# **한국어** — 표에서 같은 간격 코드는 양 끝의 코드 값을 거의 쓰지 않고 가운데 코드 값에 값이 몰립니다. NF4는 코드
# 값을 더 고르게 씁니다. 이를 한 숫자로 잰 것이 "사용한 정보량"(코드 값별 비율의 엔트로피)이며, 16개를 똑같이 쓰면
# 4비트가 됩니다. NF4도 완전히 고르지는 않은데, 마지막 줄이 그 이유를 보여 줍니다. NF4의 코드 값은 N(0, 1)을 그
# 분위수 하나로 나눈 분포를 가정하지만, 64개 중 최댓값으로 나눈 실제 값들은 그보다 조금 더 0 쪽으로 모여 있습니다
# (표준편차가 더 작습니다). 히스토그램 양 끝(±1)에 솟은 막대는 각 블록의 absmax 값 자체입니다. absmax로 나누면
# 정확히 ±1이 되므로, 블록마다 한 값이 반드시 그 자리에 떨어집니다. 코드 값을 고르게 쓸수록 같은 16개로 오차가
# 작아집니다. 아래 셀이 같은 데이터에서 두 코드의 평균 오차를 비교합니다.
#
# **English** — In the table the evenly spaced code hardly uses its outer levels and crowds values into its middle
# ones; NF4 uses its levels more evenly. One number for this is the "information used" (the entropy of the level
# shares), 4 bits only when all 16 levels are used equally. NF4 is not perfectly even either, and the last line
# shows why: its levels assume N(0, 1) divided by one of its quantiles, while values divided by the largest of 64
# samples sit a little closer to 0 (a smaller std). The bars that spike at the ends (±1) are each block's absmax
# itself: divided by itself it lands exactly on ±1, so every block puts one value there. The more evenly the levels
# are used, the smaller the error from the same 16 values; the cell below compares the mean
# error of both codes on the same data.

# %%
err_nf4 = (fake_quantize(samples, NF4_CODE) - samples).abs().mean()
err_uniform = (fake_quantize(samples, UNIFORM_CODE) - samples).abs().mean()
print(f"mean |error| on N(0,1) data: NF4 {err_nf4:.4f}, uniform 4-bit {err_uniform:.4f} "
      f"(NF4 is {err_uniform / err_nf4:.2f}× smaller)")
assert err_nf4 < err_uniform

outlier = torch.randn(64, 64)  # 4096 values...
outlier[0, 0] = 40.0  # ...one of them an outlier
other_rows_error = {}
for blocksize in (4096, 64):
    q = quantize_nf4(outlier, blocksize=blocksize, double_quant=False)
    other_rows_error[blocksize] = (dequantize_nf4(q) - outlier)[1:].abs().mean()  # rows without the outlier
    print(f"one outlier, blocksize {blocksize:>4}: mean |error| of the other rows {other_rows_error[blocksize]:.4f}")
assert other_rows_error[64] < other_rows_error[4096]

# %% [markdown]
# **한국어** — 위 출력의 마지막 두 줄은 이상치가 하나 있을 때 블록 크기의 효과를 보여 줍니다. 4096개 전체를 한
# 블록으로 하면(텐서 전체에 스케일 하나) 이상치와 상관없는 값들의 오차까지 커지고, 64개 블록이면 이상치가 든 블록만
# 손해를 봅니다.
#
# **English** — The last two lines above show the effect of the block size with one outlier: with all 4096 values
# in one block (one scale for the whole tensor) even the values far from the outlier get a large error; with
# blocks of 64 only the outlier's block suffers.
#
# ## 5.4 블록 하나를 손으로 · One block by hand
#
# **한국어** — 이제 실제 가중치처럼 생긴 행렬(N(0, 0.02))의 **첫 블록(값 64개)** 을 손으로 양자화하고, minilora의
# `quantize_nf4`가 만든 결과와 한 비트까지 같은지 확인합니다. 순서는 이렇습니다.
#
# 1. `absmax = max |w|` (블록의 값 64개 중),
# 2. `scaled = w × (1/absmax)` → [-1, 1] 안의 값,
# 3. 가장 가까운 NF4 값의 번호(0–15, 4비트),
# 4. 두 번호를 한 바이트에 담기: 앞 원소는 상위 4비트(high nibble), 뒤 원소는 하위 4비트(low nibble),
# 5. 역양자화(dequantize): `NF4_CODE[번호] × absmax`.
#
# **English** — Now quantize, by hand, **the first block of 64** of a weight-like matrix (N(0, 0.02)) and check it
# bit for bit against minilora's `quantize_nf4`. The steps:
#
# 1. `absmax = max |w|` over the 64 values;
# 2. `scaled = w × (1/absmax)`, now in [-1, 1];
# 3. the index (0–15, 4 bits) of the nearest NF4 value;
# 4. two indices per byte: the first element in the high nibble, the second in the low nibble;
# 5. dequantize: `NF4_CODE[index] × absmax`.

# %%
weight = torch.randn(1024, 4096) * 0.02  # (d_out, d_in), shaped like a real projection
block = weight.flatten()[:64]

absmax = block.abs().max()
scaled = block * (1.0 / absmax)  # the reciprocal, then a multiply: the same fp32 arithmetic as bitsandbytes
index = nearest_code(scaled, NF4_CODE)
restored = NF4_CODE[index] * absmax
print(f"absmax of block 0: {absmax.item():.6f}\n")
print(f"{'i':>3}{'w':>11}{'scaled':>10}{'index':>7}{'NF4 value':>11}{'restored':>11}{'error':>11}")
for i in range(8):
    print(f"{i:>3}{block[i]:>11.6f}{scaled[i]:>10.4f}{index[i]:>7}{NF4_CODE[index[i]]:>+11.4f}"
          f"{restored[i]:>11.6f}{restored[i] - block[i]:>+11.2e}")
print("  ... (56 more)")

byte = (index[0].item() << 4) | index[1].item()
print(f"\nbyte 0 = index[0] << 4 | index[1] = {index[0].item()} << 4 | {index[1].item()} = {byte} "
      f"= 0b{byte:08b}  (high nibble {byte >> 4:04b}, low nibble {byte & 0xF:04b})")

q = quantize_nf4(weight, blocksize=64, double_quant=False)
print(f"minilora: absmax[0] = {q.absmax[0].item():.6f}, packed[0] = {q.packed[0, 0].item()} "
      f"(packed shape {tuple(q.packed.shape)}, absmax shape {tuple(q.absmax.shape)})")
packed_by_hand = (index[0::2] << 4) | index[1::2]  # (32,) bytes of block 0
assert q.absmax[0] == absmax and torch.equal(q.packed[:32, 0].long(), packed_by_hand)
assert torch.equal(dequantize_nf4(q).flatten()[:64], restored)
print("the hand-made block equals minilora's bit for bit")

# %% [markdown]
# ## 5.5 이중 양자화 · Double quantization
#
# **한국어** — 블록마다 fp32 absmax를 하나씩 두면, 64개 가중치마다 32비트, 즉 **가중치당 32/64 = 0.5비트**가 더
# 듭니다. 4비트 가중치에 0.5비트는 작지 않습니다. **이중 양자화**는 absmax 값들을 다시 양자화합니다. absmax들의
# 평균을 빼고, 256개씩 묶어 8비트(bitsandbytes의 "dynamic" 코드)로 저장하며, 그 묶음마다 fp32 스케일 하나만
# 둡니다. 그러면 가중치당 8/64 + 32/(64·256)비트가 됩니다.
#
# 아래 셀은 minilora의 `bits_per_parameter`(실제로 저장되는 텐서의 바이트로 센 값)를 두 방식에 대해 출력하고, 위
# 식과 비교합니다. 또 이중 양자화가 absmax에 더하는 오차와, 그 결과 가중치 오차가 얼마나 늘어나는지도 잽니다.
#
# **English** — One fp32 absmax per block costs 32 bits per 64 weights: **32/64 = 0.5 bits per weight** on top of
# 4 — not small. **Double quantization** quantizes the absmax values themselves: subtract their mean, store them
# as 8-bit codes (bitsandbytes' "dynamic" code) in groups of 256, and keep one fp32 scale per group: 8/64 +
# 32/(64·256) bits per weight.
#
# The cell prints minilora's `bits_per_parameter` (counted from the bytes of the tensors actually stored) for both
# and compares it with these formulas; it also measures the error double quantization adds to the absmax and how
# much that grows the weight error.

# %%
q_dq = quantize_nf4(weight, blocksize=64, double_quant=True)
formula = {False: 4 + 32 / 64, True: 4 + 8 / 64 + 32 / (64 * 256)}
for label, qq in (("NF4, fp32 absmax", q), ("NF4 + double quant", q_dq)):
    print(f"{label:20} {qq.nbytes:>10,} bytes for {qq.numel:,} weights = {qq.bits_per_parameter:.4f} bits/param "
          f"(formula {formula[qq.double_quant]:.4f})")
    assert abs(qq.bits_per_parameter - formula[qq.double_quant]) < 1e-3

absmax_dq = dequantize_absmax(q_dq)
rel = ((absmax_dq - q.absmax).abs() / q.absmax)
print(f"\nabsmax after double quantization: mean relative error {rel.mean():.2e}, max {rel.max():.2e}")
err_plain = (dequantize_nf4(q) - weight).abs().mean()
err_dq = (dequantize_nf4(q_dq) - weight).abs().mean()
print(f"mean |weight error|: fp32 absmax {err_plain:.4e}, double-quantized absmax {err_dq:.4e} "
      f"(+{(err_dq / err_plain - 1):.2%})")
assert err_dq < 1.01 * err_plain  # 8-bit scales barely change the error

# %% [markdown]
# **한국어** — 위 출력처럼 이중 양자화는 가중치당 비트를 줄이면서 오차는 거의 늘리지 않습니다. QLoRA가 기본으로
# 쓰는 설정입니다.
#
# **English** — As printed above, double quantization saves bits per weight while barely raising the error; QLoRA
# uses it by default.
#
# ## 5.6 측정한 오차 · The measured error
#
# **한국어** — 이제 오차를 제대로 잽니다. 두 가지 가중치를 씁니다. 하나는 위의 정규분포 행렬이고, 다른 하나는 기본
# 모델의 **실제로 학습된** 선형층 가중치 전부입니다. 각각 양자화→역양자화한 뒤 평균·최대 절대 오차, 상대 오차
# ‖W − Ŵ‖/‖W‖, 그리고 입력 x에 대한 출력 오차 ‖xWᵀ − xŴᵀ‖/‖xWᵀ‖를 출력합니다. 또 한 값의 오차는 그 블록의
# absmax × (가장 넓은 코드 값 간격의 절반)을 넘을 수 없는데, 아래 셀이 이를 확인합니다(fp32 absmax의 경우).
#
# **English** — Now measure the error properly, on two weights: the normal matrix above and every **actually
# trained** linear weight of the default model. After a quantize → dequantize round trip the cell prints the mean
# and max absolute error, the relative error ‖W − Ŵ‖/‖W‖, and the output error ‖xWᵀ − xŴᵀ‖/‖xWᵀ‖ for random inputs
# x. The error of one value can never exceed its block's absmax × half the widest gap of the code; the cell checks
# that too (with fp32 absmax).

# %%
half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2


def report(name: str, w: torch.Tensor) -> torch.Tensor:
    """Quantize w (double quant), print its errors, check the bound; return the error tensor."""
    err = dequantize_nf4(quantize_nf4(w)) - w
    x = torch.randn(32, w.shape[1])  # (N, d_in)
    out_err = (x @ err.T).norm() / (x @ w.T).norm()
    print(f"{name:34}{err.abs().mean():>11.3e}{err.abs().max():>11.3e}{err.norm() / w.norm():>9.2%}{out_err:>9.2%}")
    plain = dequantize_nf4(quantize_nf4(w, double_quant=False)) - w  # fp32 absmax: the bound is exact
    bound = w.flatten().reshape(-1, 64).abs().amax(dim=1, keepdim=True) * half_gap
    assert (plain.flatten().reshape(-1, 64).abs() <= bound * (1 + 1e-6)).all()
    return err


print(f"{'weight':34}{'mean|err|':>11}{'max|err|':>11}{'rel err':>9}{'out err':>9}")
error = report(f"N(0, 0.02) {tuple(weight.shape)}", weight)
model = load_model(_course.default_model())
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.0."):
        report(name.removeprefix("model.layers.0."), module.weight.detach())
trained = [m.weight.detach().flatten() for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
report(f"all {len(trained)} block linears of the model", torch.cat(trained).reshape(-1, 64))

path = histogram((error.flatten()[:65536] / 0.02).tolist(), _course.figure_path("05_nf4_error.svg"), bins=80,
                 title="NF4 round-trip error of an N(0, 0.02) weight", xlabel="error / weight std (0.02)")
_course.show_figure(path)

# %% [markdown]
# **한국어** — 오차 히스토그램(`05_nf4_error.svg`, 세로축: 구간마다 든 값의 수)은 가운데가 넓고 평평합니다. 두 코드 값
# 사이의 구간 안에서 값이 어디에 떨어질지는 거의 무작위라서, 오차가 ±(간격의 절반) 사이에 고르게 퍼지기 때문입니다.
# 대부분의 값이 있는 0 근처는 간격이 좁고, 얇은 양쪽 꼬리는 절댓값이 블록의 absmax에 가까운 값들입니다. 코드 값의
# 간격이 가장 넓은 곳이 ±1 근처이기 때문입니다. 위 표의 상대 오차가 4비트로 줄인 대가이며, QLoRA는 이 오차가 있는
# 얼린 가중치 위에서 LoRA를 학습해 그 차이까지 함께 보정합니다(8장).
#
# 히스토그램 한가운데, 오차 0의 막대는 이웃보다 유난히 높이 솟아 있습니다. 블록마다 절댓값이 가장 큰 원소(absmax)는
# absmax로 나누면 정확히 ±1이 되고, ±1은 NF4 코드에 있는 값이므로 그 원소는 오차 없이 되돌아옵니다. 블록 크기가
# 64이므로 전체 값의 1/64 ≈ 1.6%입니다. 그림의 가중치는 기본 설정인 이중 양자화로 양자화했는데, 이중 양자화는 absmax
# 자체를 8비트로 반올림하므로 이 원소들의 오차는 0이 아니라 아주 작은 값이 되며, 대부분 여전히 가운데 막대에 듭니다.
# 아래 셀이 두 경우를 잽니다.
#
# **English** — The error histogram (`05_nf4_error.svg`, y axis: values per bin) has a broad, flat top: where a value
# falls inside its level's interval is close to random, so its error spreads evenly between minus and plus half a
# gap. Most values live near 0 where the gaps are narrow; the thin tails are values near a block's edge (close to
# its absmax), where the gaps are widest. The relative error in the table is the price of 4 bits; QLoRA trains LoRA
# on top of these slightly-off frozen weights, so the adapter also learns to compensate (chapter 8).
#
# In the middle of the histogram a bar spikes at error 0. Each block's largest-magnitude element (its absmax)
# divides to exactly ±1, a value the NF4 code holds, so it comes back without error: with blocks of 64 that is
# 1/64 ≈ 1.6% of all values. The weight in the figure was quantized with double quantization (the default), which
# rounds the absmax itself to 8 bits, so these elements' errors are tiny rather than zero, most of them still in
# the middle bar. The cell below measures both cases.

# %%
blocks64 = weight.flatten().view(-1, 64)
is_absmax = (blocks64.abs() == blocks64.abs().amax(dim=1, keepdim=True)).flatten()
for dq in (False, True):
    err = (dequantize_nf4(quantize_nf4(weight, double_quant=dq)) - weight).flatten().abs()
    print(f"double_quant={dq!s:5}: absmax elements {is_absmax.float().mean():.2%} of all; their median |error| "
          f"{err[is_absmax].median():.1e}, everyone's {err.median():.1e}")
    if not dq:
        assert (err[is_absmax] == 0).all()  # ±1 is a code value: exact

# %% [markdown]
# ## 5.7 실제 모델 크기의 메모리 · Memory for real model sizes
#
# **한국어** — QLoRA는 블록 안의 선형층만 4비트로 바꾸고, 임베딩·출력층·정규화 층(RMSNorm)의 가중치는 16비트로 둡니다.
# 아래 셀은 2장과 같은 공개 설정의 모양으로 minilora 모델을 meta 장치에 만들어 두 부분의 파라미터를 세고, minilora가 잰
# `bits_per_parameter`로 메모리를 계산합니다. 끝에서 두 번째 열은 QLoRA 학습에 필요한 메모리(4비트 가중치 + r = 16
# all-linear LoRA의 fp32 가중치·기울기·Adam 상태, 활성값 제외)이고, 마지막 열은 비교를 위해 2장의 전체
# 파인튜닝(파라미터당 16바이트)을 다시 적은 것입니다.
#
# **English** — QLoRA turns only the linear layers inside the blocks into 4 bits; embeddings, the output head and
# norms stay 16-bit. The cell builds minilora models on the meta device from the same published shapes as
# chapter 2, counts both parts, and computes the memory with the `bits_per_parameter` minilora measured. The last
# column but one is the memory for QLoRA training (4-bit weights + fp32 weights, gradients and Adam states of an
# r = 16 all-linear LoRA, activations excluded); the last repeats chapter 2's full fine-tuning (16 bytes per
# parameter) for comparison.

# %%
bits = {False: q.bits_per_parameter, True: q_dq.bits_per_parameter}
print(f"{'model':14}{'params':>8}{'bf16':>10}{'NF4':>10}{'NF4+DQ':>10}{'bf16/NF4+DQ':>12}{'DQ saves':>10}"
      f"{'QLoRA train':>13}{'full FT':>12}")
for name, shape in _course.REAL_MODELS.items():
    meta = _course.meta_model(shape)
    in_blocks = sum(m.weight.numel() for n, m in meta.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    _, total = count_parameters(meta)
    rest = total - in_blocks  # embedding, (untied) lm_head, norms: kept in bf16
    gib = {dq: (in_blocks * bits[dq] / 8 + rest * 2) / GiB for dq in (False, True)}
    apply_lora(meta, r=16, alpha=32, targets="all-linear")
    trainable, _ = count_parameters(meta)
    qlora = gib[True] + trainable * 16 / GiB
    print(f"{name:14}{total / 1e9:>7.2f}B{total * 2 / GiB:>6.2f} GiB{gib[False]:>6.2f} GiB{gib[True]:>6.2f} GiB"
          f"{total * 2 / GiB / gib[True]:>11.2f}×{(gib[False] - gib[True]) * 1024:>6.0f} MiB{qlora:>9.2f} GiB"
          f"{total * 16 / GiB:>8.1f} GiB")  # full FT: 16 bytes per parameter (chapter 2, bf16 mixed precision)
    assert gib[True] < gib[False] < total * 2 / GiB

# %% [markdown]
# **한국어** — 위 표의 마지막 두 열을 비교해 보세요. 4비트 양자화와 LoRA를 함께 쓰면, 전체 파인튜닝으로는
# 데이터센터 GPU 여러 장이 필요한 모델을 GPU 한 장에서 학습할 수 있습니다. 줄어드는 비율("bf16/NF4+DQ"
# 열)이 4보다 한참 작은 것은 임베딩과 출력층이 16비트로 남기 때문입니다. 그 몫이 클수록(2장에서 출력한 비율) 이
# 비율이 작아집니다.
#
# **English** — Compare the last two columns: 4-bit weights plus LoRA train on one GPU
# a model whose full fine-tuning would need several data-centre GPUs. The saving ratio (column "bf16/NF4+DQ")
# stays well below 4 because the embedding and output head stay 16-bit; the larger their share of the parameters
# (printed in chapter 2), the smaller the ratio.
#
# ## 정리 · Summary
#
# **한국어**
# - 4비트 숫자는 16개의 값만 가집니다. NF4는 그 값을 정규분포의 분위수에 두어, 정규분포 모양의 가중치에서 같은
#   간격 코드보다 오차가 작습니다(위에서 측정).
# - 가중치는 값 64개짜리 블록마다 absmax로 나눈 뒤 가장 가까운 코드의 번호로 저장되고, 한 바이트에 두 개씩 담깁니다.
#   손으로 만든 블록이 minilora의 결과와 비트 단위로 같음을 확인했습니다.
# - 이중 양자화는 absmax를 8비트로 다시 양자화해 가중치당 비트를 줄이며, 오차는 거의 늘리지 않습니다.
# - 8장에서 이 4비트 가중치를 얼린 채 LoRA를 학습하는 QLoRA와, 역양자화와 행렬 곱을 한 번에 하는 Triton 커널을 봅니다.
#
# **English**
# - A 4-bit number has 16 values. NF4 puts them at normal quantiles and, on normally distributed weights, has a
#   smaller error than an evenly spaced code (measured above).
# - A weight is divided by the absmax of each block of 64 and stored as nearest-code indices, two per byte; the
#   hand-made block matched minilora's bit for bit.
# - Double quantization re-quantizes the absmax values to 8 bits, saving bits per weight at almost no error.
# - Chapter 8 trains LoRA on top of these frozen 4-bit weights (QLoRA) and walks through the Triton kernel that
#   dequantizes and multiplies in one pass.

# %% [markdown]
# ## 연습 문제 · Exercises
#
# **한국어** — 함수를 채우고 셀을 다시 실행하세요(풀이: `tutorials/solutions/05_quantization.py`).
#
# 1. **NF4 왕복.** `nf4_roundtrip(x)`: 64개 값의 블록 하나를 absmax로 나누고, `NF4_CODE`의 16개 값 중 가장 가까운
#    값으로 바꾼 뒤 다시 absmax를 곱하세요. 검사는 `quantize_nf4`/`dequantize_nf4`와 비교합니다.
# 2. **파라미터당 비트.** `bits_per_parameter(double_quant)`: 큰 가중치에서 NF4가 쓰는 비트(코드 4비트 + 블록
#    스케일). 이중 양자화가 있을 때와 없을 때를 종이 위에서 계산하세요.
#
# **English** — Fill in the functions and run the cell again (solutions: `tutorials/solutions/05_quantization.py`).
#
# 1. **An NF4 round trip.** `nf4_roundtrip(x)`: divide one block of 64 values by its absmax, replace each by the
#    nearest of `NF4_CODE`'s 16 values, multiply by absmax again; the check compares with
#    `quantize_nf4`/`dequantize_nf4`.
# 2. **Bits per parameter.** `bits_per_parameter(double_quant)`: what NF4 stores per weight of a large matrix (the
#    4-bit code plus the block scales), with and without double quantization, worked out on paper.

# %%
import _exercises  # noqa: E402  (the checks; tutorials/_exercises.py)

def nf4_roundtrip(x):
    raise NotImplementedError  # your code here


def bits_per_parameter(double_quant: bool) -> float:
    raise NotImplementedError  # your code here


_exercises.try_it(_exercises.EXERCISES["5.1"], nf4_roundtrip)
_exercises.try_it(_exercises.EXERCISES["5.2"], bits_per_parameter)
