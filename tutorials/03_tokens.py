# %% [markdown]
# # 3. 토큰 · Tokens
#
# **한국어** — 모델은 글자를 읽지 못합니다. 토크나이저가 글을 **토큰**(자주 나오는 글자 조각)으로 나누고, 각
# 토큰을 어휘 사전의 번호(**토큰 ID**)로 바꿉니다. 모델이 받는 것은 이 번호들의 텐서 `input_ids`와, 어느 위치가
# 진짜 글이고 어느 위치가 패딩(padding, 빈자리 채우기)인지 알려 주는 `attention_mask`입니다. 학습할 때는 여기에 정답
# `labels`가 더해지고, 손실에서 빼고 싶은 위치에는 `-100`을 적습니다.
#
# 이 장에서는 "안녕하세요. 파인튜닝을 시작합니다." 한 문장을 기본 모델의 토크나이저로 직접 나눠 보고, 길이가 다른
# 문장들을 한 배치로 묶을 때 무슨 일이 일어나는지, 그리고 `-100`이 손실에서 정확히 무엇을 하는지 계산으로
# 확인합니다.
#
# **English** — A model cannot read characters. The tokenizer cuts text into **tokens** (frequent pieces of text)
# and maps each to its number in the vocabulary (the **token id**). The model receives a tensor of these numbers,
# `input_ids`, and an `attention_mask` saying which positions are real text and which are padding. For training,
# `labels` are added, with `-100` wherever a position should not count in the loss.
#
# This chapter tokenizes one sentence, "안녕하세요. 파인튜닝을 시작합니다." ("Hello. Let's start fine-tuning."), with
# the default model's tokenizer, batches sentences of different lengths, and computes exactly what `-100` does to
# the loss.

# %%
import torch
import torch.nn.functional as F

import _course
from minilora.formats.safetensors_folder import load_model
from minilora.data import IGNORE_INDEX, pad_collate, pad_id
from minilora.loss import next_token_loss
from minilora.tokenizer import load_tokenizer

model_dir = _course.default_model()
tokenizer = load_tokenizer(model_dir)
model = load_model(model_dir)
print(tokenizer)

# %% [markdown]
# ## 3.1 한 문장을 토큰으로 · One sentence into tokens
#
# **한국어** — 아래 셀은 문장의 `input_ids`와, 토큰 하나하나가 원문의 어느 부분에서 왔는지(토크나이저가 돌려주는
# 글자 위치 `offsets`)를 표로 출력합니다. 맨 앞의 `<bos>`(begin of sequence)는 원래 문장에 없던 토큰입니다. 이
# 토크나이저는 모든 글 앞에 이 토큰을 자동으로 붙입니다(Llama 3와 같은 방식).
#
# **English** — The cell below prints the sentence's `input_ids` and, for each token, the part of the original text
# it came from (the character spans `offsets` the tokenizer returns). The leading `<bos>` (begin of sequence) is not
# in the sentence: this tokenizer puts it in front of every text (as Llama 3's does).

# %%
sentence = "안녕하세요. 파인튜닝을 시작합니다."
input_ids, offsets = tokenizer.encode_with_offsets(sentence, add_special_tokens=True)
attention_mask = [1] * len(input_ids)
print("input_ids     :", input_ids)
print("attention_mask:", attention_mask)
assert input_ids == tokenizer.encode(sentence)
assert input_ids[0] == tokenizer.bos_token_id



def byte_of_char() -> dict[str, int]:
    """Byte-level BPE (GPT-2's scheme) writes each byte as one printable character: printable Latin-1 bytes
    stand for themselves, the others (space, control bytes, 0x7F-0xA0, 0xAD) are shifted to code points 256 and up."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


BYTE_OF = byte_of_char()
print(f"\n{'pos':>3} {'id':>5}  {'token (byte-level)':20} {'bytes':22} text")
all_bytes = b""
for pos, (tid, (start, end)) in enumerate(zip(input_ids, offsets)):
    piece = tokenizer.id_to_token(tid)
    if tid == tokenizer.bos_token_id:
        shown = "(special token)"
    else:
        raw = bytes(BYTE_OF[c] for c in piece)
        all_bytes += raw
        shown = raw.hex(" ")
    print(f"{pos:>3} {tid:>5}  {piece!r:20} {shown:22} {sentence[start:end]!r}")
assert all_bytes == sentence.encode("utf-8")  # the tokens are exactly the sentence's UTF-8 bytes, cut in pieces

pieces_of = [sum(a <= i < b for a, b in offsets) for i in range(len(sentence))]  # tokens covering each character
print("\ncharacters cut into several tokens:", [c for c, n in zip(sentence, pieces_of) if n > 1])
print("tokens holding several characters :", [sentence[a:b] for a, b in offsets if len(sentence[a:b].strip()) > 1])

# %% [markdown]
# **한국어** — 이 토크나이저는 **바이트 수준 BPE**입니다. 글을 먼저 UTF-8 바이트로 바꾸고, 학습 데이터에서 자주
# 붙어 나온 바이트 쌍을 한 쌍씩 차례로 합쳐 어휘를 만듭니다. 한글 한 음절은 UTF-8로 3바이트입니다. 학습 데이터에 자주
# 나온 음절이나 단어는 토큰 하나가 되고(위 셀의 마지막 줄), 드문 음절은 바이트 조각 여러 개로 쪼개집니다(그 위
# 줄). 그런 조각 하나만 디코딩하면 완전한 글자가 아니므로 `�`가 나옵니다. 표의 "bytes" 열에서 각 토큰이 몇
# 바이트인지 확인해 보세요. 이 토크나이저의 어휘는 작습니다. 실제 모델의 어휘는 그보다 훨씬 커서(2장이 Llama 3의
# 어휘 크기를 출력합니다) 더 많은 음절과 단어를 통째로 토큰 하나로 둡니다.
#
# **English** — This is a **byte-level BPE** tokenizer: text becomes UTF-8 bytes first, and the vocabulary is built
# by repeatedly merging the byte pairs that occur together most often in the training text. A Hangul syllable is 3
# bytes of UTF-8. Syllables or words frequent in the training text become one token (the cell's last line);
# rare syllables fall apart into several byte pieces (the line above it), and one such piece alone decodes to `�`
# because it is not a whole character. The "bytes" column shows how many bytes each token holds. This tokenizer's
# vocabulary is small; a real model's is many times larger (chapter 2 prints Llama 3's), so it keeps more
# syllables and words whole.

# %%
english = "Hello. Let's start fine-tuning."
for text in (sentence, english):
    n_tokens = len(tokenizer.encode(text, add_special_tokens=False))
    print(f"{text!r:40} {len(text):>3} characters, {len(text.encode('utf-8')):>3} UTF-8 bytes, "
          f"{n_tokens:>3} tokens ({n_tokens / len(text):.2f} tokens per character)")
roundtrip = tokenizer.decode(input_ids, skip_special_tokens=True)
print("decode(input_ids) →", repr(roundtrip))
assert roundtrip == sentence  # byte-level BPE loses nothing

# %% [markdown]
# ## 3.2 배치와 패딩 · Batches and padding
#
# **한국어** — 학습은 여러 문장을 한 번에(배치로) 처리합니다. 텐서는 직사각형이어야 하므로 짧은 문장 뒤를
# **패딩 토큰**으로 채워 가장 긴 문장에 길이를 맞춥니다. minilora의 `pad_collate`(`minilora/data.py`)가 이 일을
# 하며, 세 텐서를 함께 만듭니다.
#
# - `input_ids`: 패딩 위치에는 패딩 토큰의 ID,
# - `attention_mask`: 진짜 토큰은 1, 패딩은 0 — 모델이 패딩을 보지 않게 합니다,
# - `labels`: 진짜 토큰은 자기 ID, 패딩은 `-100` — 손실이 패딩을 세지 않게 합니다.
#
# **English** — Training processes several sentences at once (a batch). A tensor must be rectangular, so shorter
# sentences are filled up with a **padding token** to the length of the longest. minilora's `pad_collate`
# (`minilora/data.py`) does this and builds three tensors:
#
# - `input_ids`: the padding token's id at padded positions;
# - `attention_mask`: 1 for real tokens, 0 for padding — the model does not look at padding;
# - `labels`: a real token's own id, `-100` for padding — the loss does not count padding.

# %%
texts = [sentence, "안녕하세요.", "Fine-tuning starts now."]
samples = [{"input_ids": tokenizer.encode(t)} for t in texts]
batch = pad_collate(samples, pad_id=pad_id(tokenizer))
print(f"pad token: {tokenizer.pad_token!r} (id {pad_id(tokenizer)})")
for key in ("input_ids", "attention_mask", "labels"):
    print(f"\n{key} {tuple(batch[key].shape)}:\n{batch[key]}")
assert (batch["attention_mask"] == (batch["labels"] != IGNORE_INDEX)).all()

# %% [markdown]
# ## 3.3 다음 토큰 맞히기와 라벨 · Next-token prediction and labels
#
# **한국어** — 언어 모델은 위치 t에서 **다음 토큰(t+1)** 을 맞힙니다. 그래서 손실은 `logits[:, :-1]`과
# `labels[:, 1:]`을 짝지어 계산합니다(`minilora/loss.py`의 `next_token_loss`). 아래 표는 두 번째 문장에 대해 각
# 위치가 무엇을 보고 무엇을 맞혀야 하는지 보여 줍니다. 정답이 `-100`인 위치는 손실에 들어가지 않습니다.
#
# **English** — A language model predicts, at position t, **the next token (t+1)**, so the loss pairs
# `logits[:, :-1]` with `labels[:, 1:]` (`next_token_loss` in `minilora/loss.py`). The table below shows, for the
# second sentence, what each position sees and what it must predict. Positions whose target is `-100` do not enter
# the loss.

# %%
row = 1
ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
print(f"{'t':>3}  {'input token at t':22}{'target = label at t+1':24}counted")
for t in range(len(ids) - 1):
    target = labels[t + 1]
    shown = "-100" if target == IGNORE_INDEX else repr(tokenizer.decode([target]))
    print(f"{t:>3}  {tokenizer.decode([ids[t]])!r:22}{shown:24}{target != IGNORE_INDEX}")

# %% [markdown]
# ## 3.4 `-100`이 하는 일 · What `-100` does
#
# **한국어** — 이제 기본 모델로 배치의 손실을 계산합니다. 세 가지를 비교합니다.
#
# 1. **마스킹한 손실**: `pad_collate`가 만든 라벨(패딩 = `-100`) 그대로.
# 2. **마스킹하지 않은 손실**: 라벨을 `input_ids`로 바꿔서 패딩 위치도 "정답"으로 세는 경우.
# 3. **문장마다 따로**: 패딩 없이 한 문장씩 계산한 손실을 토큰 수로 가중 평균한 값.
#
# 1과 3이 같아야 합니다. 즉, 패딩한 배치의 손실은 패딩이 없는 것과 똑같고, 패딩 토큰은 하나도 세지지 않습니다.
# 2에는 패딩을 맞히는 쉬운(또는 의미 없는) 문제까지 섞이므로 값과 토큰 수가 모두 달라집니다. 아래 셀이 세 값과
# 각각 센 토큰 수를 출력하고, PyTorch의 `F.cross_entropy(ignore_index=-100)`와도 비교합니다.
#
# **English** — Now compute the batch's loss with the default model and compare three numbers:
#
# 1. the **masked loss**, with `pad_collate`'s labels (padding = `-100`);
# 2. the **unmasked loss**, with labels = `input_ids`, so padded positions count as targets too;
# 3. **each sentence alone**: the loss of every sentence without padding, averaged with token-count weights.
#
# 1 and 3 must be equal: a padded batch has exactly the loss of no padding at all, and not one padding token
# counts. 2 mixes in the easy (or meaningless) task of predicting padding, so both its value and its token count
# differ. The cell prints the three values with the tokens each counted, and checks PyTorch's
# `F.cross_entropy(ignore_index=-100)` too.

# %%
with torch.no_grad():
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T, V)
    masked, n_masked = next_token_loss(logits, batch["labels"])
    unmasked, n_unmasked = next_token_loss(logits, batch["input_ids"])
    alone = [next_token_loss(model(torch.tensor([s["input_ids"]])), torch.tensor([s["input_ids"]]), reduction="sum")
             for s in samples]
per_sentence = sum(loss for loss, _ in alone) / sum(n for _, n in alone)
reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                            ignore_index=IGNORE_INDEX)
print(f"1. masked (padding = -100)   loss {masked.item():.5f} over {int(n_masked)} tokens")
print(f"2. unmasked (padding counts) loss {unmasked.item():.5f} over {int(n_unmasked)} tokens")
print(f"3. each sentence alone       loss {per_sentence.item():.5f} over {sum(int(n) for _, n in alone)} tokens")
print(f"   F.cross_entropy(ignore_index=-100) = {reference.item():.5f}")
assert torch.allclose(masked, per_sentence, atol=1e-5) and torch.allclose(masked, reference, atol=1e-5)
assert int(n_masked) == sum(int(n) for _, n in alone) < int(n_unmasked)
assert not torch.allclose(unmasked, masked, atol=1e-3)  # counting padding changes the loss

# %% [markdown]
# **한국어** — 마지막으로 기울기를 봅니다. 정답이 `-100`인 위치의 로짓(logit)은 손실에 전혀 기여하지 않으므로
# 역전파로 받는 기울기가 정확히 0이어야 합니다. 그래서 그 위치는 모델을 조금도 바꾸지 못합니다. 7장의 인스트럭트
# 파인튜닝은 같은 방법으로 질문(프롬프트) 토큰의 라벨에 `-100`을 적어 응답만 학습합니다.
#
# **English** — Last, the gradient. A logit whose target is `-100` contributes nothing to the loss, so its gradient
# must be exactly zero: that position cannot change the model at all. Instruct fine-tuning in chapter 7 uses the
# same trick, writing `-100` on the question (prompt) tokens so that only the response trains.

# %%
logits = logits.detach().requires_grad_(True)
loss, _ = next_token_loss(logits, batch["labels"])
loss.backward()
ignored = torch.cat([batch["labels"][:, 1:] == IGNORE_INDEX, torch.ones_like(batch["labels"][:, :1], dtype=torch.bool)],
                    dim=1)  # (B, T): position t is ignored when label t+1 is -100; the last position predicts nothing
grad_norm = logits.grad.norm(dim=-1)  # (B, T)
print(f"positions with target -100: {int(ignored.sum())}, "
      f"largest gradient there: {grad_norm[ignored].max().item():.1e}")
print(f"positions that count      : {int((~ignored).sum())}, smallest gradient there: "
      f"{grad_norm[~ignored].min().item():.1e}")
assert (grad_norm[ignored] == 0).all() and (grad_norm[~ignored] > 0).all()

# %% [markdown]
# ## 3.5 허깅페이스에서는 · The same in Hugging Face
#
# **한국어** — 허깅페이스 `transformers`로 같은 일을 하면 다음과 같습니다.
#
# ```python
# from transformers import AutoTokenizer, DataCollatorForLanguageModeling
# tok = AutoTokenizer.from_pretrained(model_dir)
# enc = tok(text, return_tensors="pt")                       # input_ids, attention_mask: (1, T)
# collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm=False)
# batch = collator([{"input_ids": ids} for ids in rows])    # 오른쪽 패딩, labels = input_ids, 패딩은 -100
# loss = hf_model(**batch).loss                             # 한 칸 밀어서 -100을 뺀 평균 교차 엔트로피
# ```
#
# `transformers`가 설치되어 있으면 아래 셀이 두 쪽을 나란히 실행해 `input_ids`, 라벨, 손실이 같은지 확인합니다.
# **함정 하나:** 콜레이터는 라벨을 `input_ids == pad_token_id`인 곳에서 `-100`으로 바꿉니다. 패딩 토큰이 없는
# 모델에서 흔히 하듯 `tok.pad_token = tok.eos_token`으로 두면 **진짜 EOS도 지워져** 모델이 글을 끝내는 법을 배우지
# 못합니다. minilora의 `pad_collate`는 토큰 ID가 아니라 **각 샘플의 길이**로 패딩을 알아내므로 이 문제가 없습니다.
# 아래 셀이 두 경우에 학습되는 EOS의 수를 셉니다.
#
# **English** — With Hugging Face `transformers` the same steps read:
#
# ```python
# from transformers import AutoTokenizer, DataCollatorForLanguageModeling
# tok = AutoTokenizer.from_pretrained(model_dir)
# enc = tok(text, return_tensors="pt")                       # input_ids, attention_mask: (1, T)
# collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm=False)
# batch = collator([{"input_ids": ids} for ids in rows])    # right padding, labels = input_ids, -100 on padding
# loss = hf_model(**batch).loss                             # the shifted mean cross-entropy without -100
# ```
#
# When `transformers` is installed, the cell below runs both side by side and checks that `input_ids`, labels and
# loss agree. **One pitfall:** the collator sets a label to `-100` wherever `input_ids == pad_token_id`. With the
# common `tok.pad_token = tok.eos_token` (for models that have no pad token) **the real EOS is erased too**, and the
# model never learns to end a text. minilora's `pad_collate` finds padding from **each sample's length**, not from
# token ids, so it cannot make that mistake. The cell counts the EOS tokens trained in both cases.

# %%
if _course.has("transformers"):
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    enc = hf_tok(sentence, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == tokenizer.encode(sentence)
    print("tok(text, return_tensors='pt')['input_ids'] == tokenizer.encode(text): True")

    rows = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in (sentence, english)]  # each text ends in EOS
    ours = pad_collate([{"input_ids": ids} for ids in rows], pad_id(tokenizer))
    hf_tok.padding_side = "right"
    theirs = DataCollatorForLanguageModeling(tokenizer=hf_tok, mlm=False)([{"input_ids": ids} for ids in rows])
    assert torch.equal(theirs["input_ids"], ours["input_ids"]) and torch.equal(theirs["labels"], ours["labels"])
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hf_loss = hf_model(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"],
                           labels=theirs["labels"]).loss
        our_loss, _ = next_token_loss(model(ours["input_ids"], attention_mask=ours["attention_mask"]), ours["labels"])
    print(f"labels equal; loss: transformers {hf_loss.item():.6f}, minilora {our_loss.item():.6f}")
    assert abs(hf_loss.item() - our_loss.item()) < 1e-4

    hf_tok.pad_token = hf_tok.eos_token  # the common recipe when a model has no pad token
    pad_is_eos = DataCollatorForLanguageModeling(tokenizer=hf_tok, mlm=False)([{"input_ids": ids} for ids in rows])
    ours_eos = pad_collate([{"input_ids": ids} for ids in rows], tokenizer.eos_token_id)
    trained_eos = lambda b: int(((b["labels"] == tokenizer.eos_token_id)).sum())  # noqa: E731
    print(f"pad = eos: EOS tokens trained: DataCollatorForLanguageModeling {trained_eos(pad_is_eos)}, "
          f"pad_collate {trained_eos(ours_eos)} (of {len(rows)} texts)")
    assert trained_eos(pad_is_eos) == 0 and trained_eos(ours_eos) == len(rows)
else:
    print("transformers is not installed: the side-by-side comparison is skipped (pip install transformers)")

# %% [markdown]
# ## 정리 · Summary
#
# **한국어**
# - 토크나이저는 글을 토큰 ID로 바꿉니다. 바이트 수준 BPE는 어떤 글이든 손실 없이 나타내지만, 드문 한글 음절은
#   여러 바이트 조각으로 쪼갭니다.
# - 배치는 짧은 문장을 패딩으로 채워 만들고, `attention_mask`는 모델이 패딩을 보지 않게, `labels`의 `-100`은 손실이
#   패딩을 세지 않게 합니다.
# - 위 셀들은 마스킹한 배치 손실이 문장별 손실과 같고, `-100` 위치의 기울기가 정확히 0임을 확인했습니다.
#
# **English**
# - The tokenizer turns text into token ids; byte-level BPE represents any text without loss but splits rare
#   Hangul syllables into several byte pieces.
# - A batch pads shorter sentences; `attention_mask` keeps the model from looking at padding and `-100` in
#   `labels` keeps the loss from counting it.
# - The cells above checked that the masked batch loss equals the per-sentence loss and that positions with
#   target `-100` get exactly zero gradient.

# %% [markdown]
# ## 연습 문제 · Exercises
#
# **한국어** — 함수를 채우고 셀을 다시 실행하세요(풀이: `tutorials/solutions/03_tokens.py`).
#
# 1. **패딩을 손으로.** `pad_batch(rows, pad_id)`: `pad_collate`처럼 오른쪽을 채운 `(input_ids, attention_mask,
#    labels)`를 만드세요.
# 2. **`-100` 마스크를 직접 쓰기.** `mask_prompt(input_ids, prompt_len)`: 앞의 `prompt_len`개 토큰의 라벨을
#    `-100`으로 바꾼 새 목록을 돌려주세요. 인스트럭트 파인튜닝에서 프롬프트를 학습하지 않는 방법이 바로 이것입니다.
# 3. **마스킹한 손실.** `masked_loss(logits, labels)`: 한 칸 밀어서 `-100`을 뺀 교차 엔트로피의 평균을
#    계산하세요(`F.cross_entropy(..., ignore_index=-100)`가 도와줍니다). 검사는 `next_token_loss`와 비교합니다.
#
# **English** — Fill in the functions and run the cell again (solutions: `tutorials/solutions/03_tokens.py`).
#
# 1. **Padding by hand.** `pad_batch(rows, pad_id)`: build right-padded `(input_ids, attention_mask, labels)` as
#    `pad_collate` does.
# 2. **Write the `-100` mask yourself.** `mask_prompt(input_ids, prompt_len)`: return a new list with the first
#    `prompt_len` labels set to `-100` — how instruct fine-tuning leaves the prompt untrained.
# 3. **The masked loss.** `masked_loss(logits, labels)`: the shifted cross-entropy averaged over targets that are not
#    `-100` (`F.cross_entropy(..., ignore_index=-100)` helps); the check compares with `next_token_loss`.

# %%
import _exercises  # noqa: E402  (the checks; tutorials/_exercises.py)

def pad_batch(rows: list[list[int]], pad_id: int):
    raise NotImplementedError  # your code here


def mask_prompt(input_ids: list[int], prompt_len: int) -> list[int]:
    raise NotImplementedError  # your code here


def masked_loss(logits, labels):
    raise NotImplementedError  # your code here


_exercises.try_it(_exercises.EXERCISES["3.1"], pad_batch)
_exercises.try_it(_exercises.EXERCISES["3.2"], mask_prompt)
_exercises.try_it(_exercises.EXERCISES["3.3"], masked_loss)
