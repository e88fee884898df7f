# %% [markdown]
# # 7. 인스트럭트 파인튜닝 · Instruct fine-tuning
#
# **한국어**
#
# 6장의 베이스 파인튜닝은 날것의 글로 **지식**을 가르쳤습니다. 인스트럭트 파인튜닝(SFT, supervised
# fine-tuning)은 **형식과 태도**를 가르칩니다: 사용자의 질문을 받으면 답하고, 지시를 따르고, 응답이 끝나면
# 멈추는 것. 데이터는 (지시문, 입력, 출력) 또는 대화 기록이고, 모델은 그것을 **채팅 템플릿**으로 렌더링한 글을
# 읽습니다. 그리고 손실은 **응답 토큰에서만** 계산합니다.
#
# 이 장의 순서: 채팅 템플릿(Gemma의 `<start_of_turn>user … <end_of_turn>` 형식) → instruction/input/output을
# 대화로 바꾸기 → 학습/검증 나누기 → 응답만 학습하는 손실(-100 마스크) → 경계를 지키는 패킹(segment id,
# position id) → `TrainConfig(mode="sft")`로 학습하며 과적합과 가장 좋은 체크포인트 보기 → 형식을 배웠는지 재기.
#
# 가르칠 형식은 JSON입니다. 모델은 모든 질문에 `{"answer": ..., "language": "en" | "ko"}` 꼴로 답해야 합니다.
# 배웠는지는 학습 데이터에 없는 질문 12개(`smollm2_json_eval.jsonl`: 영어 8개, 한국어 4개)에 대한 응답 가운데 올바른
# JSON(질문의 언어까지 맞는 것)의 비율로, 학습 전후에 잽니다(`smollm2.measure_sft`).
#
# 어떤 모델인가: 6장과 같습니다. SmolLM2-135M-Instruct가 설치되어 있고 빠른 모드가 아니면 그것을, 아니면 작은 기본
# 모델을 학습합니다. 6장을 같은 모델로 먼저 실행했다면 6장의 결과(어댑터를 병합한 모델)에서 시작해, 넣은 지식 위에
# 형식을 가르칩니다. 아니면 원래 모델에서 시작합니다. 첫 코드 셀이 어느 쪽인지 출력합니다. 템플릿, 라벨, 패킹을
# 설명하는 7.1–7.5절은 언제나 작은 모델의 Gemma 형식 템플릿으로 보여 주고, SmolLM2가 학습할 때는 그 템플릿(ChatML)도
# 나란히 보여 줍니다.
#
# **English**
#
# Chapter 6's base fine-tuning taught **knowledge** from raw text. Instruct fine-tuning (SFT, supervised
# fine-tuning) teaches **format and behaviour**: answer the user's question, follow the instruction, stop when the
# answer is done. The data are (instruction, input, output) records or conversations; the model reads them rendered
# through its **chat template**, and the loss is computed **on the answer tokens only**.
#
# The path: the chat template (Gemma's `<start_of_turn>user … <end_of_turn>` format) → instruction/input/output
# into conversations → train/validation split → response-only loss (the -100 mask) → packing without leakage
# (segment ids, position ids) → training with `TrainConfig(mode="sft")`, overfitting and the best checkpoint →
# measuring whether the format was learned.
#
# The format to teach is JSON: every answer as `{"answer": ..., "language": "en" | "ko"}`. Whether it is learned is
# measured on 12 questions the training data never contains (`smollm2_json_eval.jsonl`: 8 English, 4 Korean): the
# share of replies that are well-formed JSON with the question's language, before and after (`smollm2.measure_sft`).
#
# Which model: as in chapter 6, SmolLM2-135M-Instruct when it is installed and this is not fast mode, else the tiny
# default model. If chapter 6 ran first on the same model, this chapter starts from its result (the adapter merged
# in) and teaches the format on top of the injected knowledge; otherwise it starts from the original model. The
# first code cell prints which. Sections 7.1–7.5, on templates, labels and packing, always use the tiny model's
# Gemma-style template; when SmolLM2 trains, its own template (ChatML) is shown beside it.

# %%
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch

import _course
from minilora.adapter import load_adapter
from minilora.chat_template import render_chat_template
from minilora.data import IGNORE_INDEX, pad_collate, pad_id, read_records, split_train_val
from minilora.default import smollm2
from minilora.default.demos import SFT_DEMO, SMOLLM2_SFT
from minilora.formats import load_model  # a Hugging Face folder or a GGUF file
from minilora.generation import generate
from minilora.loss import next_token_loss
from minilora.plot import panel_chart
from minilora.sft import (build_sft_samples, detect_format, load_conversations, pack_samples, record_to_messages,
                          tokenize_conversation)
from minilora.tokenizer import load_tokenizer
from minilora.train import train
from minilora.train_config import TrainConfig

torch.manual_seed(0)
T0 = time.time()
FAST = _course.FAST


run_dir = _course.run_dir  # where a training run goes (a temp folder, outside the repository)


GGUF = _course.real_model()  # SmolLM2-135M-Instruct's GGUF file when installed and not in fast mode, else None
REAL = GGUF is not None


def start_model(base: Path) -> Path:
    """Chapter 6's result (`base` with chapter 6's adapter merged in) when chapter 6 ran first on this same base
    model, else `base` itself: SFT then teaches the format on top of the injected knowledge."""
    from minilora.merge import merge

    adapter = run_dir("06_base_finetuning") / "adapter"
    name = base.name if base.suffix == ".gguf" else "the default model"
    config = adapter / "adapter_config.json"
    if config.is_file() and json.loads(config.read_text())["base_model_name_or_path"] == str(base):
        merged = run_dir("07_start_from_chapter_6")
        shutil.rmtree(merged, ignore_errors=True)
        print(f"starting from chapter 6's result: {adapter} merged into {name}")
        return Path(merge(base, adapter, merged))
    print(f"no chapter-6 adapter for {name} at {adapter}: starting from {name} itself (run chapter 6 first to "
          "build on its result)")
    return base


START = start_model(GGUF if REAL else _course.default_model())  # the model this chapter fine-tunes
MODEL_DIR = _course.default_model() if REAL else START  # the tiny model of sections 7.1-7.5
model = load_model(MODEL_DIR)
tokenizer = load_tokenizer(MODEL_DIR)
print("fast mode:", FAST)
print((f"real model: {GGUF.name}" if REAL else "model: the tiny default model") + f", fine-tuned in 7.6 from {START}")

# %% [markdown]
# ## 7.1 채팅 템플릿 · The chat template
#
# **한국어**
#
# 채팅 모델은 대화를 하나의 글로 읽습니다. 누가 말하는지, 어디서 말이 끝나는지를 특수 토큰으로 표시하는데,
# 그 규칙이 **채팅 템플릿**입니다. 템플릿은 모델 폴더의 `tokenizer_config.json`에 Jinja 문법으로 들어 있고,
# minilora는 자체 Jinja 엔진(`minilora.chat_template`)으로 그것을 렌더링합니다.
#
# 이 장의 예는 Gemma 형식입니다. Gemma는 각 발화를 `<start_of_turn>역할\n내용<end_of_turn>\n`으로 감싸고,
# 어시스턴트 역할을 `model`이라고 부르며, 글 맨 앞에 `<bos>`를 둡니다. minilora의 기본 모델은 이와 같은 모양의
# 템플릿을 갖고 있으므로 그것으로 직접 확인해 봅시다.
#
# **English**
#
# A chat model reads a conversation as one text. Special tokens mark who speaks and where each turn ends; the rules
# are the **chat template**, stored in Jinja syntax in the model folder's `tokenizer_config.json` and rendered by
# minilora's own Jinja engine (`minilora.chat_template`).
#
# Our running example is Gemma's format: every turn is wrapped as `<start_of_turn>role\ncontent<end_of_turn>\n`,
# the assistant's role is called `model`, and the text starts with `<bos>`. minilora's default model carries a
# template of exactly this shape, so we can look at it directly.

# %%
print("the default model's chat template (Jinja):\n")
print(tokenizer.chat_template)
for token in ("<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"):
    print(f"{token:16s} id {tokenizer.token_to_id(token)}")
print("generation stops at ids:", tokenizer.eos_token_ids,
      [tokenizer.id_to_token(i) for i in tokenizer.eos_token_ids])
assert tokenizer.token_to_id("<end_of_turn>") in tokenizer.eos_token_ids

# %%
conversation = [
    {"role": "user", "content": "하늘 차밭은 어디에 있나요?"},
    {"role": "assistant", "content": "달모루섬에 있습니다."},
]
text = tokenizer.render_chat(conversation)
print("the whole conversation:\n" + text)
prompt = tokenizer.render_chat(conversation[:1], add_generation_prompt=True)
print("what the model sees when it must answer (add_generation_prompt=True):\n" + prompt)

# The tokenizer only passes its special tokens to the template engine; calling the engine gives the same text.
assert text == render_chat_template(tokenizer.chat_template, conversation, bos_token=tokenizer.bos_token,
                                    eos_token=tokenizer.eos_token)
assert text.startswith(prompt)  # the answer continues the prompt: this is what response-only labels rely on

# %% [markdown]
# **한국어**
#
# 시스템 메시지: 이 기본 템플릿은 `system` 역할을 별도의 턴으로 그대로 씁니다. 실제 Gemma에는 시스템 역할이
# 없습니다. Gemma 1·2의 공식 템플릿은 시스템 메시지를 오류로 거부하고, Gemma 3의 템플릿은 시스템 내용을 첫
# 사용자 메시지 앞에 붙여 넣습니다. 같은 데이터라도 템플릿에 따라 모델이 읽는 글이 달라지므로, **학습과
# 추론에서 반드시 같은 템플릿**을 써야 합니다. 아래는 두 가지 방식을 나란히 렌더링한 것입니다(두 번째는 Gemma 3
# 방식을 흉내 내려고 메시지를 직접 합쳤습니다).
#
# **English**
#
# System messages: this default template writes a `system` turn as is. Gemma itself has no system role: the
# official Gemma 1 and 2 templates reject a system message with an error, and Gemma 3's puts the system text in
# front of the first user message. The same data thus become different texts under different templates — **train
# and infer with the same template**. Below, both ways side by side (for the second we merged the messages
# ourselves, imitating Gemma 3).

# %%
system = {"role": "system", "content": "짧게 답하세요."}
print(tokenizer.render_chat([system] + conversation))
gemma_style = [{"role": "user", "content": system["content"] + "\n\n" + conversation[0]["content"]}, conversation[1]]
print(tokenizer.render_chat(gemma_style))

# %% [markdown]
# **한국어**
#
# SmolLM2의 템플릿은 ChatML 형식입니다. 각 발화를 `<|im_start|>역할\n내용<|im_end|>\n`으로 감싸고, 어시스턴트
# 역할은 `assistant`이며, 맨 앞에 `<bos>`가 없습니다. 그리고 대화에 시스템 메시지가 없으면 템플릿이 기본 시스템
# 메시지("You are a helpful AI assistant named SmolLM, trained by Hugging Face")를 스스로 넣습니다. 7.6절에서
# SmolLM2를 학습하면 학습 대화와 평가 질문이 모두 이 기본 시스템 메시지와 함께 렌더링됩니다. 학습과 추론에 같은
# 템플릿을 쓰므로 문제가 없습니다. SmolLM2를 학습하지 않는 실행(작은 모델, 빠른 모드)에서는 이 셀을 건너뜁니다.
#
# **English**
#
# SmolLM2's template is ChatML: every turn is wrapped as `<|im_start|>role\ncontent<|im_end|>\n`, the assistant's
# role is `assistant`, and there is no `<bos>` in front. When a conversation has no system message, the template
# adds a default one itself ("You are a helpful AI assistant named SmolLM, trained by Hugging Face"). When section
# 7.6 trains SmolLM2, its training conversations and its evaluation questions are all rendered with that default
# system message — the same template for training and inference, so nothing is lost. A run that does not train
# SmolLM2 (the tiny model, fast mode) skips this cell.

# %%
if REAL:
    real_tokenizer = load_tokenizer(START)  # SmolLM2's tokenizer and ChatML template (from its GGUF file)
    print(f"{START.name}'s chat template:\n{real_tokenizer.chat_template}\n")
    print(real_tokenizer.render_chat(conversation))
    assert real_tokenizer.render_chat(conversation).startswith("<|im_start|>system\n")  # the default system turn
else:
    print("SmolLM2 is not fine-tuned in this run: only the tiny model's template is shown")

# %% [markdown]
# ### 허깅페이스에서는 · The same in Hugging Face
#
# **한국어** — `transformers`에서 같은 렌더링은 `tok.apply_chat_template(messages, tokenize=False)`이고, 학습은 보통
# TRL의 `SFTTrainer`가 맡습니다.
#
# ```python
# from trl import SFTConfig, SFTTrainer
# config = SFTConfig(output_dir="out", max_length=256, packing=True, assistant_only_loss=True,
#                    num_train_epochs=1, learning_rate=2e-4)
# trainer = SFTTrainer(model=hf_model, args=config, train_dataset=dataset,   # {"messages": [...]} 레코드
#                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
# trainer.train()
# ```
#
# 차이 두 가지: TRL의 `assistant_only_loss=True`는 응답 위치를 템플릿 안의 `{% generation %}` … `{% endgeneration %}`
# 표시에서 얻으므로, 그 표시가 없는 템플릿(대부분의 모델)에는 쓸 수 없습니다. minilora는 프롬프트만 렌더링한 글과
# 응답까지 렌더링한 글을 비교해 응답을 찾으므로(7.4절) 어떤 템플릿에도 표시가 필요 없습니다. 또 패킹할 때
# minilora는 `segment_ids`로 샘플 경계를 막습니다(7.5절). `transformers`가 설치되어 있으면 아래 셀이 두 렌더링이
# 같은지(텍스트와 토큰) 확인합니다.
#
# **English** — In `transformers` the same rendering is `tok.apply_chat_template(messages, tokenize=False)`, and
# training is usually TRL's `SFTTrainer`:
#
# ```python
# from trl import SFTConfig, SFTTrainer
# config = SFTConfig(output_dir="out", max_length=256, packing=True, assistant_only_loss=True,
#                    num_train_epochs=1, learning_rate=2e-4)
# trainer = SFTTrainer(model=hf_model, args=config, train_dataset=dataset,   # {"messages": [...]} records
#                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
# trainer.train()
# ```
#
# Two differences: TRL's `assistant_only_loss=True` finds the reply from `{% generation %}` … `{% endgeneration %}`
# markers inside the template, so it cannot be used with templates that lack them (most models'). minilora finds
# the reply by comparing the text rendered with the prompt only and with the reply (section 7.4), so no template
# needs markers. And when packing, minilora keeps samples apart with `segment_ids` (section 7.5). When
# `transformers` is installed, the cell below checks that both renderings agree (text and tokens).

# %%
if _course.has("transformers"):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    for messages, gen in ((conversation, False), (conversation[:1], True), ([system] + conversation, False)):
        hf_text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert hf_text == tokenizer.render_chat(messages, add_generation_prompt=gen)
        hf_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)
        assert list(hf_ids["input_ids"]) == tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
    print("apply_chat_template: transformers and minilora give the same text and ids on 3 conversations")
else:
    print("transformers is not installed: the side-by-side comparison is skipped")

# %% [markdown]
# ## 7.2 instruction/input/output을 대화로 · Instruction/input/output into conversations
#
# **한국어**
#
# `instruct.jsonl`은 Alpaca 형식입니다: `instruction`(과제), `input`(선택: 추가 입력), `output`(배울 응답).
# `record_to_messages`는 이것을 사용자 턴과 어시스턴트 턴으로 이루어진 대화로 바꿉니다. `input`이 있으면
# 지시문 뒤에 빈 줄을 두고 붙입니다. 원래 Alpaca 프롬프트의 머리말("Below is an instruction...")은 쓰지 않습니다.
# 틀은 모델 자신의 채팅 템플릿이 만들어 주기 때문입니다. `messages`(OpenAI 형식)와 ShareGPT 형식도 같은
# 대화로 바뀝니다.
#
# **English**
#
# `instruct.jsonl` is in the Alpaca format: `instruction` (the task), `input` (optional extra input), `output` (the
# answer to learn). `record_to_messages` turns a record into a user turn and an assistant turn; a non-empty `input`
# follows the instruction after a blank line. The original Alpaca preamble ("Below is an instruction...") is not
# used: the model's own chat template provides the framing. The `messages` (OpenAI) and ShareGPT formats become the
# same kind of conversation.

# %%
INSTRUCT = _course.default_data("instruct.jsonl")
records = read_records(INSTRUCT)
fmt = detect_format(records[0][1])
with_input = [(where, r) for where, r in records if r.get("input")]
print(f"{INSTRUCT.name}: {len(records)} records, format {fmt!r}, {len(with_input)} with a non-empty input")
for where, record in (records[0], with_input[0]):
    print(f"\n{where}\n  record:  {json.dumps(record, ensure_ascii=False)}")
    for m in record_to_messages(record, fmt):
        print(f"  {m['role']:9s}: {m['content']!r}")
assert record_to_messages(with_input[0][1], fmt)[0]["content"] == with_input[0][1]["instruction"] + "\n\n" + \
    with_input[0][1]["input"]

# %% [markdown]
# ## 7.3 학습/검증 나누기 · Train/validation split
#
# **한국어**
#
# 대화 단위로 나눕니다. 시드로 고정된 무작위 추출이라 다시 실행해도 같은 대화가 검증 세트에 들어갑니다. 검증
# 대화는 학습에 쓰지 않으므로, 나중에 "처음 보는 질문"에 모델이 어떻게 답하는지 볼 때 씁니다.
#
# **English**
#
# The split is made on conversations, by a seeded draw, so the same conversations land in validation on every run.
# Validation conversations are never trained on; later we use them to see how the model answers questions it has
# not seen.

# %%
VAL_FRACTION = 0.1
conversations = load_conversations(INSTRUCT)
train_conv, val_conv = split_train_val(conversations, VAL_FRACTION, seed=0)
print(f"{len(conversations)} conversations -> {len(train_conv)} training, {len(val_conv)} validation")
print("validation examples:", [m[0]["content"] for _, m in val_conv[:3]])

# %% [markdown]
# ## 7.4 응답만 학습하기 · Response-only loss
#
# **한국어**
#
# 프롬프트(사용자 질문과 템플릿 표시)까지 학습하면 모델은 질문을 지어내는 법도 배우게 됩니다. 보통은 응답만
# 학습합니다: 응답 토큰은 `labels`에 자기 id를 그대로 두고, 나머지는 -100으로 바꿔 손실에서 뺍니다.
# `tokenize_conversation`은 응답의 위치를 템플릿 자체에서 찾습니다. `add_generation_prompt=True`로 렌더링한
# 프롬프트 바로 뒤부터, 응답과 그것을 닫는 `<end_of_turn>`까지입니다. `<end_of_turn>`도 학습해야 모델이
# **멈추는 법**을 배웁니다.
#
# 아래에서 ⟦ ⟧ 안이 학습되는 부분입니다. SmolLM2를 학습하는 실행에서는 같은 대화를 SmolLM2의 템플릿으로도
# 보여 줍니다.
#
# **English**
#
# Training on the prompt too (the user's question and the template's markers) would also teach the model to invent
# questions. The usual choice is to train on the answer only: answer tokens keep their id as label, every other
# position gets -100 and drops out of the loss. `tokenize_conversation` finds the answer from the template itself:
# it starts right after the prompt rendered with `add_generation_prompt=True` and runs through the `<end_of_turn>`
# that closes it. `<end_of_turn>` is trained too: that is how the model learns to **stop**.
#
# Below, the part inside ⟦ ⟧ is trained. A run that trains SmolLM2 also shows the same conversation in SmolLM2's
# template.

# %%
def show_trained(sample: dict, tokenizer=tokenizer) -> str:
    """The sample's text with trained runs in ⟦ ⟧ (runs are decoded whole: a Korean character may span tokens)."""
    out, run, trained = [], [], None
    for tok, label in zip(sample["input_ids"], sample["labels"]):
        is_trained = label != IGNORE_INDEX
        if run and is_trained != trained:
            out.append(("⟦{}⟧" if trained else "{}").format(tokenizer.decode(run)))
            run = []
        run.append(tok)
        trained = is_trained
    out.append(("⟦{}⟧" if trained else "{}").format(tokenizer.decode(run)))
    return "".join(out)


messages = with_input[0][1]
messages = record_to_messages(messages, fmt)
sample = tokenize_conversation(tokenizer, messages)
n_trained = sum(label != IGNORE_INDEX for label in sample["labels"])
print(show_trained(sample))
print(f"{len(sample['input_ids'])} tokens, {n_trained} trained ({100 * n_trained / len(sample['input_ids']):.0f}%)")

trained_text = tokenizer.decode([t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX])
assert trained_text == messages[-1]["content"].strip() + "<end_of_turn>"
assert sample["input_ids"] == tokenizer.apply_chat_template(messages)  # the same ids as the chat template gives
if REAL:  # the same conversation in SmolLM2's ChatML: the reply and its closing <|im_end|> are trained
    print("\nSmolLM2's template:\n" + show_trained(tokenize_conversation(real_tokenizer, messages), real_tokenizer))

# %% [markdown]
# **한국어**
#
# 경계 부분을 토큰 하나씩 봅시다(영어 대화라 토큰 조각을 읽기 쉽습니다). 손실은 위치 t의 로짓으로 t+1번째
# 토큰을 예측하므로, 손실에 들어가는 토큰 수는 "학습 표시된 토큰 중 첫 위치를 뺀 것"입니다. `train_on_prompt=True`로
# 바꾸면 모든 토큰이 학습되는 것과 비교해 보세요.
#
# **English**
#
# Let us look at the boundary token by token (an English conversation: its token pieces are easy to read). The loss
# predicts token t+1 from position t, so the number of tokens it counts is the number of trained labels after the
# first position. Compare with `train_on_prompt=True`, which trains on every token.

# %%
english = record_to_messages(records[0][1], fmt)
sample_en = tokenize_conversation(tokenizer, english)
ids, labels = sample_en["input_ids"], sample_en["labels"]
start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
print(" pos    id  label  token")
for i in range(max(0, start - 5), min(len(ids), start + 4)):
    print(f"{i:4d}  {ids[i]:4d}  {labels[i]:5d}  {tokenizer.decode([ids[i]])!r}")
print("   ...")
for i in range(len(ids) - 3, len(ids)):
    print(f"{i:4d}  {ids[i]:4d}  {labels[i]:5d}  {tokenizer.decode([ids[i]])!r}")

with torch.no_grad():
    logits = model(torch.tensor([ids]))  # (1, T, V)
    loss_reply, n_reply = next_token_loss(logits, torch.tensor([labels]))
    everything = tokenize_conversation(tokenizer, english, train_on_prompt=True)
    loss_all, n_all = next_token_loss(logits, torch.tensor([everything["labels"]]))
print(f"response-only: loss {loss_reply.item():.4f} over {int(n_reply)} tokens; "
      f"train_on_prompt: loss {loss_all.item():.4f} over {int(n_all)} tokens")
assert int(n_reply) == sum(label != IGNORE_INDEX for label in labels[1:])
assert int(n_all) == len(ids) - 1

# %% [markdown]
# ## 7.5 경계를 지키는 패킹 · Packing without leakage
#
# **한국어**
#
# 대화는 짧고 길이가 제각각입니다. 하나씩 배치로 묶으면 패딩이 많이 생깁니다. **패킹**은 여러 샘플을 한 행에
# 채워 넣습니다. 그런데 그냥 이어 붙이면 두 번째 샘플의 토큰이 첫 번째 샘플을 "볼" 수 있습니다(샘플 간
# 누출, leakage). 그래서 샘플마다 `segment_ids`(1, 2, 3, …)를 주고, 모델은 같은 세그먼트 안의 앞 토큰만 보게 합니다.
# `position_ids`도 샘플마다 0부터 다시 셉니다. 각 샘플의 첫 라벨은 -100입니다: 앞 샘플의 마지막 위치에서
# 다음 샘플의 첫 토큰을 예측하지 않도록.
# (6장의 블록은 문서 경계를 넘어 주의를 허용했습니다. 이어지는 도메인 글에는 흔한 선택이지만, 독립된 대화에는
# 맞지 않습니다. 그 이유는 6.4절에 있습니다.)
#
# **English**
#
# Conversations are short and of uneven length; batching them one per row wastes a lot on padding. **Packing** puts
# several samples into one row. Simply concatenating them would let the second sample's tokens "see" the first
# (leakage). So each sample gets a `segment_ids` value (1, 2, 3, …) and the model attends only to earlier tokens of
# the same segment; `position_ids` restart at 0 for each sample. Each sample's first label is -100, so the last
# position of one sample never predicts the first token of the next.
# (Chapter 6's blocks let attention cross document boundaries: a common choice for running domain text, wrong for
# independent conversations; section 6.4 says why.)

# %%
MAX_LEN = 256
train_samples = build_sft_samples(tokenizer, train_conv, max_len=MAX_LEN)
rows = pack_samples(train_samples, MAX_LEN)
n_tok = sum(len(s["input_ids"]) for s in train_samples)
longest = max(len(s["input_ids"]) for s in train_samples)
print(f"{len(train_samples)} samples, {n_tok:,} tokens (longest {longest})")
print(f"  one sample per row, padded to the longest: {len(train_samples)} rows, "
      f"{100 * n_tok / (len(train_samples) * longest):.0f}% real tokens")
print(f"  packed into rows of {MAX_LEN}: {len(rows)} rows, {100 * n_tok / (len(rows) * MAX_LEN):.0f}% real tokens")

row = rows[0]
segments = sorted(set(row["segment_ids"]))
print(f"\nrow 0 holds {len(segments)} samples, {len(row['input_ids'])} tokens:")
for seg in segments:
    where = [i for i, s in enumerate(row["segment_ids"]) if s == seg]
    pos = [row["position_ids"][i] for i in where]
    print(f"  segment {seg}: columns {where[0]}-{where[-1]}, position_ids {pos[0]}..{pos[-1]}, "
          f"first label {row['labels'][where[0]]}")

# %% [markdown]
# **한국어**
#
# 정말 누출이 없는지 숫자로 확인합니다: 패킹된 행 안의 두 번째 샘플의 로짓이, 그 샘플을 혼자 넣었을 때의
# 로짓과 같아야 합니다. `segment_ids`를 빼고 그냥 이어 붙이면 어떻게 되는지도 봅니다.
#
# **English**
#
# Let us check the absence of leakage in numbers: the logits of the second sample inside the packed row must equal
# its logits when it is alone. We also see what happens without `segment_ids`.

# %%
with torch.no_grad():
    packed = pad_collate([row], pad_id=pad_id(tokenizer))
    cols = [i for i, s in enumerate(row["segment_ids"]) if s == 2]
    alone = torch.tensor([row["input_ids"][cols[0]:cols[-1] + 1]])
    logits_alone = model(alone)[0]  # (n, V)
    logits_packed = model(packed["input_ids"], attention_mask=packed["attention_mask"],
                          segment_ids=packed["segment_ids"], position_ids=packed["position_ids"])[0, cols]
    logits_leaky = model(packed["input_ids"])[0, cols]  # plain causal attention over the whole row
    diff_packed = (logits_packed - logits_alone).abs().max().item()
    diff_leaky = (logits_leaky - logits_alone).abs().max().item()
    # The packed row's loss is the sum of the samples' own losses.
    row_sum, row_n = next_token_loss(model(packed["input_ids"], segment_ids=packed["segment_ids"],
                                           position_ids=packed["position_ids"]), packed["labels"], reduction="sum")
    own = []  # (loss sum, tokens) of each sample run alone
    for seg in segments:
        keep = [i for i, s in enumerate(row["segment_ids"]) if s == seg]
        ids_alone = torch.tensor([[row["input_ids"][i] for i in keep]])
        labels_alone = torch.tensor([[row["labels"][i] for i in keep]])
        own.append(next_token_loss(model(ids_alone), labels_alone, reduction="sum"))
print(f"sample 2: max |packed - alone| = {diff_packed:.2e} with segment ids, {diff_leaky:.2e} without")
print(f"packed row loss sum {row_sum.item():.4f} over {int(row_n)} tokens; "
      f"sum of the samples' own: {sum(s.item() for s, _ in own):.4f} over {sum(int(n) for _, n in own)} tokens")
assert diff_packed < 1e-4 and diff_leaky > 100 * diff_packed
assert abs(row_sum.item() - sum(s.item() for s, _ in own)) < 1e-3 and int(row_n) == sum(int(n) for _, n in own)

# %% [markdown]
# ## 7.6 학습 · Training
#
# **한국어**
#
# `mode="sft"`로 바꾸면 `train()`은 위의 과정을 그대로 밟습니다: 레코드 → 대화 → 템플릿 렌더링 → 응답만 라벨
# → (선택) 패킹. 나머지(LoRA, AdamW, 스케줄, 검증, 저장)는 6장과 같습니다.
#
# 데이터는 응답이 모두 JSON인 대화입니다. 작은 모델은 `instruct_json.jsonl`(7.2절의 120개 레코드와 같은 질문, 응답만
# `{"answer": ..., "language": ...}`로 감싼 것)을, SmolLM2는 `smollm2_json.jsonl`(일반 상식 질문 70개: 영어 50개,
# 한국어 20개)을 학습합니다. SmolLM2는 일반 상식을 이미 알고 있으므로, 이런 질문에서는 형식만이 새로 배울
# 것이고, 정답 수로 아는 것을 지켰는지도 볼 수 있습니다. 평가 질문 12개와 겹치는 질문은 없습니다. 설정은 출력되는
# TOML에 모두 나옵니다.
#
# 학습 전에 평가 질문 12개에 대한 응답을 먼저 잽니다. 그리디 디코딩이라 학습 후와 공정하게 비교할 수 있습니다.
#
# **English**
#
# With `mode="sft"`, `train()` follows exactly the steps above: records → conversations → template rendering →
# response-only labels → (optional) packing. The rest (LoRA, AdamW, schedule, validation, saving) is chapter 6's.
#
# The data are conversations whose answers are all JSON. The tiny model trains on `instruct_json.jsonl` (the same
# questions as section 7.2's 120 records, each answer wrapped as `{"answer": ..., "language": ...}`), SmolLM2 on
# `smollm2_json.jsonl` (70 general-knowledge questions, 50 English and 20 Korean): SmolLM2 already knows such
# facts, so on these questions the format is the only new thing to learn, and the count of right facts shows
# whether it keeps what it knew. None repeats one of the 12 evaluation questions. The printed TOML shows every
# setting.
#
# Before training we measure the replies to the 12 evaluation questions; decoding is greedy, so the comparison
# with after training is fair.

# %%
DATA = _course.default_data("smollm2_json.jsonl" if REAL else "instruct_json.jsonl")
EVAL = smollm2.read_jsonl(_course.default_data("smollm2_json_eval.jsonl"))  # {"question", "language", "keywords"}
REPLY_TOKENS = SMOLLM2_SFT["sample_tokens"]  # 64: Korean costs SmolLM2 several tokens a syllable
start = load_model(START, dtype="float32") if REAL else model  # the model before instruct fine-tuning
start_tokenizer = real_tokenizer if REAL else tokenizer
json_before = smollm2.measure_sft(start, start_tokenizer, EVAL, REPLY_TOKENS)
print(f"before: well-formed JSON replies {json_before['well_formed']}/{json_before['n']}, "
      f"right fact in the reply {json_before['correct']}/{json_before['n']}")
for line in json_before["samples"][:3]:
    print("  " + line.replace("\n", "\n  "))

# %% [markdown]
# **한국어**
#
# 설정에는 일부러 과적합이 보일 만큼 긴 학습을 넣고, 고치는 방법을 함께 켭니다. `save_best=True`(`--save-best`)는
# 검증 손실이 새로 가장 낮아질 때마다 체크포인트를 남기고, 학습이 끝나면 마지막 스텝이 아니라 **가장 낮은 검증
# 손실의 체크포인트**를 `adapter/`로 내보냅니다. SmolLM2는 배치 4, 학습률 2e-3으로 40스텝(약 2.5에폭)을
# 학습합니다(`--demo smollm2-sft`는 배치 8, 5e-4, 20스텝으로 더 부드럽게 학습합니다). 한 스텝이 CPU에서 몇 초라서
# 검증은 4스텝마다 합니다. 작은 모델은 JSON 데모의 설정(`SFT_DEMO`: r 32, 학습률 5e-3, 배치 8)으로 120스텝을
# 학습하고 10스텝마다 검증합니다. 두 실행 모두 `--demo`처럼 패킹 없이 학습합니다. 7.5절의 패킹은 `packing=True`
# 한 줄로 켤 수 있습니다.
#
# **English**
#
# The settings deliberately train long enough for overfitting to show, and switch its fix on: `save_best=True`
# (`--save-best`) checkpoints each new lowest validation loss and, when training ends, exports **the checkpoint of
# the lowest validation loss** to `adapter/`, not the last step. SmolLM2 trains 40 steps (about 2.5 epochs) with
# batches of 4 at learning rate 2e-3 (`--demo smollm2-sft` trains more gently: batches of 8, 5e-4, 20 steps); a
# step costs a few seconds on a CPU, so it validates every 4 steps. The tiny model trains 120 steps
# with the JSON demonstration's settings (`SFT_DEMO`: r 32, learning rate 5e-3, batches of 8) and validates every
# 10. Like the `--demo` runs, both train without packing; section 7.5's packing is one flag away, `packing=True`.

# %%
RUN = run_dir("07_instruct_finetuning")
shutil.rmtree(RUN, ignore_errors=True)
if REAL:  # --demo smollm2-sft's LoRA (r 8, alpha 16, all-linear, block 128), trained harder to show overfitting
    demo = {k: SMOLLM2_SFT[k] for k in ("r", "alpha", "dropout", "block_size", "warmup_steps")}
    settings = dict(demo, batch_size=4, lr=2e-3, max_steps=40, eval_every=4, log_every=4)
else:  # the tiny model's JSON demonstration (SFT_DEMO: r 32, alpha 64, lr 5e-3, batches of 8), 120 steps
    demo = {k: SFT_DEMO[k] for k in ("r", "alpha", "dropout", "block_size", "batch_size", "lr")}
    settings = dict(demo, warmup_steps=_course.steps(10, 1), max_steps=_course.steps(120, 4),
                    eval_every=_course.steps(10, 0), log_every=_course.steps(10, 1))
config = TrainConfig(model=str(START), data=str(DATA), mode="sft", method="lora", targets="all-linear", packing=False,
                     val_fraction=VAL_FRACTION, save_best=True, output=str(RUN), seed=0, device="auto", **settings)
print(config.to_toml())
t_train = time.time()
final = train(config)
print(f"\ntrain() took {time.time() - t_train:.1f} s")

# %%
metrics = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines()]
train_curve = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
val_curve = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
print("step  validation loss")
for step, v in val_curve:
    print(f"{step:4d}  {v:15.4f}")
print(f"validation loss on the answers {val_curve[0][1]:.4f} -> {val_curve[-1][1]:.4f} "
      f"(perplexity {math.exp(val_curve[0][1]):.1f} -> {math.exp(val_curve[-1][1]):.1f})")
if not FAST:  # a few steps on the fast mode's barely pre-trained model prove nothing about quality
    assert min(v for _, v in val_curve) < val_curve[0][1]
# the lowest validation loss after training began (step 0 is the model before training: no checkpoint to keep)
best_at, best_val = min(val_curve[1:], key=lambda step_loss: step_loss[1])
kept = {f"kept: step {best_at}": [(best_at, best_val)]}  # the checkpoint save_best exports
late = [(step, v) for step, v in val_curve if step >= val_curve[-1][0] // 2]  # the second half, on its own scale
figure = panel_chart([({"train loss": train_curve, "validation loss": val_curve, **kept}, "loss (nats/answer token)",
                       False),
                      ({"validation, 2nd half": late, **kept}, "val. loss (zoom)", False)],
                     _course.figure_path("07_instruct_finetuning_loss.svg"),
                     title=f"Instruct fine-tuning to JSON ({GGUF.name if REAL else 'tiny model'}, LoRA)",
                     xlabel="optimizer step", heights=(305, 160))
_course.show_figure(figure)

# %% [markdown]
# ### 과적합과 가장 좋은 체크포인트 · Overfitting and the best checkpoint
#
# **한국어** — 학습 손실은 계속 내려가는데 검증 손실이 어느 스텝부터 다시 오른다면, 모델이 학습 대화의 응답을
# 외우기 시작한 것입니다(**과적합**). 처음에는 모든 응답에 공통인 것(JSON의 틀, `"language"` 값, 턴을 닫는 토큰)을
# 배우므로 두 손실이 함께 내려갑니다. 틀을 다 배운 뒤에는 학습 응답의 낱말 하나하나를 외우는 것만 학습 손실을 더
# 줄이고, 그것은 처음 보는 질문에 도움이 되지 않으므로 검증 손실이 오릅니다. 데이터가 작고 같은 대화를 여러 번
# 보면(에폭이 많으면) 흔히 생깁니다. 고치는 방법은 두 가지입니다. 검증 손실이 가장 낮았던 스텝까지만 학습하거나
# (`max_steps`를 줄이기), 주기적으로 검증하면서 **가장 낮은 검증 손실의 체크포인트**를 남기는 것입니다(`save_best`,
# 연습 7.2). 아래 셀은 그 스텝을 곡선에서 계산하고 마지막 스텝과 비교한 뒤, 내보낸 어댑터의 검증 손실을 다시 재서
# 그것이 정말 가장 좋은 스텝의 것인지 확인합니다. 학습 손실은 배치 하나의 값이라 들쭉날쭉하므로, 가장 좋은 스텝
# 앞뒤의 평균으로 비교합니다. 뒤쪽의 상승은 처음 몇 스텝의 큰 하락에 비해 작으므로, 그림의 아래 칸은 검증 곡선의
# 후반부만 따로 확대해 보여 줍니다. 빠른 모드에서는 검증을 끝에서 한 번만 하므로 비교할 곡선이 없습니다.
#
# **English** — If the training loss keeps falling while the validation loss turns up from some step on, the model
# has begun to memorise the answers of its training conversations (**overfitting**). At first it learns what all
# answers share (the JSON frame, the `"language"` value, the token that closes the turn), so both losses fall
# together. Once the frame is learned, only memorising the training answers word by word lowers the training loss
# further, which does not help on questions never seen, so the validation loss rises. It is common when the data
# are small and seen for many epochs. Two fixes: train only up to the step of the lowest validation loss (a smaller
# `max_steps`), or evaluate periodically and **keep the checkpoint with the lowest validation loss** (`save_best`,
# exercise 7.2). The cell below computes that step from the curve, compares it with the last step, and measures the
# exported adapter's validation loss again to check that it is the best step's. A logged training loss is one
# batch's, so it is noisy: the cell compares its means just before and after the best step. The late rise is small
# next to the first steps' fall, so the figure's lower panel shows the second half of the validation curve on its
# own scale. In fast mode validation runs once, at the end, so there is no curve to compare.

# %%
last_at, last_val = val_curve[-1]
n_train = len(split_train_val(load_conversations(DATA), VAL_FRACTION, seed=0)[0])
batches_per_epoch = None if config.packing else math.ceil(n_train / config.batch_size)
print(f"lowest validation loss {best_val:.4f} at step {best_at}; last {last_val:.4f} at step {last_at} "
      f"({n_train} training conversations"
      + (f", {last_at / batches_per_epoch:.1f} epochs)" if batches_per_epoch else ")"))
if best_at < last_at:
    # the logged training losses are single batches (noisy): compare their means just before and after best_at
    after = [loss for step, loss in train_curve if step > best_at]
    window = [loss for step, loss in train_curve if best_at - (last_at - best_at) < step <= best_at]
    mean_after, mean_window = sum(after) / len(after), sum(window) / len(window)
    trend = "went on falling" if mean_after < mean_window else "fell no further"
    print(f"the validation loss rose by {last_val - best_val:+.4f} after step {best_at}, while the training loss "
          f"{trend} (mean of the logged batches {mean_window:.4f} up to step {best_at}, {mean_after:.4f} after), "
          f"{'far ' if mean_after < best_val / 2 else ''}below the validation loss: overfitting")
    print(f"the fix: save_best exported step {best_at}'s checkpoint to {RUN / 'adapter'} "
          f"(max_steps={best_at} would have given the same adapter)")
else:
    print("no rise: the lowest validation loss is the last one (no overfitting within this run)")
if not FAST:  # both full runs overfit (measured 2026-12-02: SmolLM2 lowest at step 20 of 40, the tiny model at 60)
    assert best_at < last_at

tuned = copy.deepcopy(start)  # the model before this chapter's training, plus the exported (best) adapter
load_adapter(tuned, RUN / "adapter")
tuned.eval()  # dropout off for measuring (load_model already returns eval mode, and LoRA layers follow it)


@torch.no_grad()
def answer_loss(model, tokenizer, conversations) -> float:
    """Mean loss per answer token over the validation conversations, one at a time (what train() validates)."""
    total, count = 0.0, 0
    for sample in build_sft_samples(tokenizer, conversations, max_len=config.block_size):
        loss_sum, n = next_token_loss(model(torch.tensor([sample["input_ids"]])), torch.tensor([sample["labels"]]),
                                      reduction="sum")
        total, count = total + loss_sum.item(), count + int(n)
    return total / count


val_data = split_train_val(load_conversations(DATA), VAL_FRACTION, seed=0)[1]
kept = answer_loss(tuned, start_tokenizer, val_data)
print(f"validation loss of the exported adapter: {kept:.4f} (step {best_at}: {best_val:.4f}; the last step's "
      f"{final['val_loss']:.4f})")
assert abs(kept - best_val) < 1e-3  # adapter/ holds the best checkpoint, not the last step

# %% [markdown]
# ## 7.7 형식을 배웠는가 · Did it learn the format?
#
# **한국어**
#
# 이제 학습 전에 잰 평가 질문 12개에 가장 좋은 체크포인트의 모델이 다시 답합니다. 대화할 때도 학습 때와 같은
# 템플릿을 씁니다: 지금까지의 대화를 `add_generation_prompt=True`로 렌더링하면 어시스턴트 턴을 여는 표시로
# 끝나고, 모델은 응답을 이어 쓰고, 턴을 닫는 토큰(작은 모델은 `<end_of_turn>`, SmolLM2는 `<|im_end|>`)에서 생성이
# 멈춥니다. 답이 `{"answer": 문자열, "language": 질문의 언어}` 그대로의 JSON이면 올바른 형식으로 셉니다. 정답 낱말
# ("Paris")이 응답에 있는지도 셉니다. 형식을 배우면서 아는 사실을 잃지 않았는지 보기 위해서입니다.
#
# 작은 모델은 평가 질문의 사실(프랑스의 수도 등)을 처음부터 모릅니다. 그래서 작은 모델에서 볼 것은 형식뿐이고,
# 정답 수는 0에 가깝습니다. 작은 모델은 응답을 끝까지 올바르게 닫는 법보다 응답의 시작(`{"answer":`)을 먼저 배울
# 수 있으므로, 셀은 JSON의 틀을 여는 응답의 수도 셉니다. SmolLM2는 사실을 알고 있으므로, 학습 후에도 정답 수가 유지되는지가 중요합니다.
# 6장의 결과에서 시작했다면, 차밭 글로 한 베이스 파인튜닝이 차밭과 관계없는 응답까지 이미 바꿔 놓았을 수 있습니다
# (7.6절에서 출력한 학습 전 응답을 보세요). 출력되는 숫자가 이번 실행에서 어땠는지 말해 줍니다.
#
# **English**
#
# Now the model of the best checkpoint answers the 12 evaluation questions measured before training. Chatting uses
# the training template too: the conversation so far, rendered with `add_generation_prompt=True`, ends with the
# marker that opens the assistant's turn; the model writes the answer, and generation stops at the token that closes
# the turn (`<end_of_turn>` for the tiny model, `<|im_end|>` for SmolLM2). A reply counts as well-formed when it is
# exactly the JSON `{"answer": string, "language": the question's language}`. We also count replies holding the
# right keyword ("Paris"), to see whether learning the format cost facts the model knew.
#
# The tiny model does not know the evaluation questions' facts (the capital of France, ...) to begin with, so with
# it only the format is to be seen and the count of right facts stays near zero. A small model may learn how a
# reply starts (`{"answer":`) before it can close it, so the cell also counts the replies that open the JSON
# frame. SmolLM2 knows them, so what
# matters is that it keeps them. When it starts from chapter 6's result, base fine-tuning on the tea-garden text may
# already have changed answers that have nothing to do with the garden (see the replies before training printed in
# section 7.6). The printed numbers say how this run went.

# %%
json_after = smollm2.measure_sft(tuned, start_tokenizer, EVAL, REPLY_TOKENS)
for b, a in zip(json_before["samples"][:4] + json_before["samples"][-2:],
                json_after["samples"][:4] + json_after["samples"][-2:]):
    question, _, before_reply = b.partition("\nassistant: ")
    print(f"{question}\n  before: {before_reply}\n  after:  {a.partition(chr(10) + 'assistant: ')[2]}")
n_eval = len(EVAL)
print(f"\nwell-formed JSON replies to {n_eval} held-out questions: {json_before['well_formed']}/{n_eval} -> "
      f"{json_after['well_formed']}/{n_eval}; right fact in the reply: {json_before['correct']}/{n_eval} -> "
      f"{json_after['correct']}/{n_eval} ({GGUF.name if REAL else 'the tiny default model'}, step {best_at})")
opened = {name: sum(m["samples"][i].partition("\nassistant: ")[2].startswith('{"answer":') for i in range(n_eval))
          for name, m in (("before", json_before), ("after", json_after))}
print(f"replies that at least open the JSON frame with {{\"answer\": : {opened['before']}/{n_eval} -> "
      f"{opened['after']}/{n_eval}")
if json_after["well_formed"] > json_before["well_formed"]:
    print(f"the model learned the format: {json_after['well_formed'] - json_before['well_formed']} more well-formed "
          "replies to questions it never trained on")
elif opened["after"] > opened["before"]:
    print("no more well-formed replies, but more replies open the JSON frame: the model has learned how a reply "
          "starts, not yet how to keep its quotes and braces balanced to the end (see the replies above)")
if not FAST:  # SmolLM2 learns the format (measured 0/12 -> 12/12); the tiny model at least its opening
    assert json_after["well_formed"] > json_before["well_formed"] if REAL else opened["after"] > opened["before"]

# %% [markdown]
# **한국어**
#
# 멈출 줄 아는지도 숫자로 봅시다. 검증 대화의 정답 바로 뒤에서 모델이 턴을 닫는 토큰에 주는 확률의 평균입니다.
# 작은 기본 모델은 평범한 글로만 사전학습되어 그 토큰을 본 적이 없습니다. SmolLM2는 이미 채팅 모델이라 학습 전에도
# 이 확률이 높을 수 있습니다. 여러 턴 대화도 같은 방식입니다. 모델의 응답을 `assistant` 메시지로 대화에 붙이고 다음
# 질문을 더해서 다시 렌더링하면 됩니다.
#
# **English**
#
# Does it know when to stop? The mean probability the model gives to the turn-closing token right after the
# reference answer of each validation conversation. The tiny default model was pre-trained on plain text and has
# never seen that token; SmolLM2 is a chat model already, so its probability may be high before training too. A
# multi-turn chat works the same way: append the model's answer as an `assistant` message, add the next question,
# and render again.

# %%
END = next(t for t in start_tokenizer.eos_token_ids
           if t in tokenize_conversation(start_tokenizer, val_data[0][1])["labels"])  # trained, and stops generation


@torch.no_grad()
def p_end_of_turn(model, tokenizer, conversations) -> float:
    """Mean probability of the turn-closing token right after each reference answer."""
    probs = []
    for _, conv in conversations:
        text = tokenizer.render_chat(conv[:1], add_generation_prompt=True) + conv[1]["content"].strip()
        logits = model(torch.tensor([tokenizer.encode(text, add_special_tokens=False)]))[0, -1]  # (V,)
        probs.append(logits.softmax(-1)[END].item())
    return sum(probs) / len(probs)


p_base, p_tuned = p_end_of_turn(start, start_tokenizer, val_data), p_end_of_turn(tuned, start_tokenizer, val_data)
print(f"mean P({start_tokenizer.id_to_token(END)} | reference answer) over {len(val_data)} validation conversations: "
      f"before {p_base:.2e} -> after {p_tuned:.2e}")
if not FAST and not REAL:  # the tiny model learns to end its turn (SmolLM2 knew already)
    assert p_tuned > p_base


@torch.no_grad()
def chat(model, tokenizer, messages: list[dict], max_new_tokens: int = REPLY_TOKENS) -> str:
    """The model's greedy reply to `messages`."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=tokenizer.eos_token_ids)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()


dialogue = [{"role": "user", "content": "Where is Haneul Tea Garden?"}]
dialogue += [{"role": "assistant", "content": chat(tuned, start_tokenizer, dialogue)},
             {"role": "user", "content": "Who founded it?"}]
dialogue += [{"role": "assistant", "content": chat(tuned, start_tokenizer, dialogue)}]
print(start_tokenizer.render_chat(dialogue))
print(f"chapter 7 ran in {time.time() - T0:.1f} s")

# %% [markdown]
# ## 연습 문제 · Exercises
#
# **한국어** — 함수를 채우고 셀을 다시 실행하세요(풀이: `tutorials/solutions/07_instruct_finetuning.py`).
#
# 1. **응답만 학습하기.** `response_only(prompt_ids, reply_ids)`: `input_ids`와, 프롬프트에 `-100`을 준 `labels`.
# 2. **가장 좋은 체크포인트.** `best_step(history)`: `(step, 검증 손실)` 목록에서 남길 스텝. 검증 손실이 내려가다
#    다시 오르면(과적합) 마지막 스텝이 아니라 가장 낮은 곳을 남깁니다(트레이너의 `--save-best`가 하는 일).
# 3. **경계를 지키는 패킹.** `packed_row(lengths)`: 한 행에 이어 붙인 샘플들의 `segment_ids`(1, 2, …)와 샘플마다
#    0부터 다시 세는 `position_ids`. 검사는 `pack_samples`와 비교합니다.
#
# **English** — Fill in the functions and run the cell again (solutions:
# `tutorials/solutions/07_instruct_finetuning.py`).
#
# 1. **Train on the response only.** `response_only(prompt_ids, reply_ids)`: `input_ids` and `labels` with `-100` on
#    the prompt.
# 2. **The best checkpoint.** `best_step(history)`: from `(step, validation loss)` pairs, the step to keep. When the
#    validation loss falls and then rises again (overfitting), keep the lowest point, not the last step (what the
#    trainer's `--save-best` does).
# 3. **Packing without leakage.** `packed_row(lengths)`: the `segment_ids` (1, 2, ...) of samples packed into one row
#    and `position_ids` restarting at 0 in each; the check compares with `pack_samples`.

# %%
import _exercises  # noqa: E402  (the checks; tutorials/_exercises.py)

def response_only(prompt_ids: list[int], reply_ids: list[int]) -> dict:
    raise NotImplementedError  # your code here


def best_step(history: list[tuple[int, float]]) -> int:
    raise NotImplementedError  # your code here


def packed_row(lengths: list[int]):
    raise NotImplementedError  # your code here


_exercises.try_it(_exercises.EXERCISES["7.1"], response_only)
_exercises.try_it(_exercises.EXERCISES["7.2"], best_step)
_exercises.try_it(_exercises.EXERCISES["7.3"], packed_row)
