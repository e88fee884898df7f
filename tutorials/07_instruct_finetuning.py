# %% [markdown]
# # 7. 인스트럭트 파인튜닝 · Instruct fine-tuning
#
# **한국어**
#
# 6장의 베이스 파인튜닝은 날것의 글로 **지식**을 가르쳤습니다. 인스트럭트 파인튜닝(SFT, supervised
# fine-tuning)은 **형식과 태도**를 가르칩니다: 사용자의 질문을 받으면 답하고, 지시를 따르고, 답이 끝나면
# 멈추는 것. 데이터는 (지시, 입력, 출력) 또는 대화 기록이고, 모델은 그것을 **채팅 템플릿**으로 렌더링한 글을
# 읽습니다. 그리고 손실은 **답변 토큰에서만** 계산합니다.
#
# 이 장의 순서: 채팅 템플릿(Gemma의 `<start_of_turn>user … <end_of_turn>` 형식) → instruction/input/output을
# 대화로 바꾸기 → 학습/검증 나누기 → 답변만 학습하는 손실(-100 마스크) → 경계를 지키는 패킹(segment id,
# position id) → `TrainConfig(mode="sft")`로 학습 → 학습된 모델과 대화하기.
#
# 6장을 먼저 실행했다면 이 장은 그 결과(기본 모델에 도메인 어댑터를 병합한 모델)에서 시작해, 넣은 지식 위에 형식을
# 가르칩니다. 아니면 기본 모델에서 시작합니다. 첫 코드 셀이 어느 쪽인지 출력합니다.
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
# (segment ids, position ids) → training with `TrainConfig(mode="sft")` → chatting with the result.
#
# If chapter 6 ran first, this chapter starts from its result (the default model with the domain adapter merged in)
# and teaches the format on top of the injected knowledge; otherwise it starts from the default model. The first
# code cell prints which.

# %%
import json
import math
import shutil
import time
from pathlib import Path

import torch

import _course
from minilora.adapter import load_adapter
from minilora.chat_template import render_chat_template
from minilora.formats.safetensors_folder import load_model
from minilora.data import IGNORE_INDEX, pad_collate, pad_id, read_records, split_train_val
from minilora.generation import generate
from minilora.loss import next_token_loss
from minilora.plot import line_chart
from minilora.sft import (build_sft_samples, detect_format, load_conversations, pack_samples, record_to_messages,
                          tokenize_conversation)
from minilora.tokenizer import load_tokenizer
from minilora.train import train
from minilora.train_config import TrainConfig

torch.manual_seed(0)
T0 = time.time()
FAST = _course.FAST


run_dir = _course.run_dir  # where a training run goes (a temp folder, outside the repository)


def start_model():
    """Chapter 6's result (the default model with its domain adapter merged in) when chapter 6 ran first with this
    default model, else the default model itself: SFT then teaches the format on top of the injected knowledge."""
    from minilora.merge import merge

    base = _course.default_model()
    adapter = run_dir("06_base_finetuning") / "adapter"
    config = adapter / "adapter_config.json"
    if config.is_file() and json.loads(config.read_text())["base_model_name_or_path"] == str(base):
        merged = run_dir("07_start_from_chapter_6")
        shutil.rmtree(merged, ignore_errors=True)
        print(f"starting from chapter 6's result: {adapter} merged into the default model")
        return Path(merge(base, adapter, merged))
    print(f"chapter 6's adapter not found at {adapter}: starting from the default model (run chapter 6 first "
          "to build on its result)")
    return base


MODEL_DIR = start_model()
model = load_model(MODEL_DIR)
tokenizer = load_tokenizer(MODEL_DIR)
print("fast mode:", FAST, "| model:", MODEL_DIR)

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
# 차이 두 가지: TRL의 `assistant_only_loss=True`는 답변 위치를 템플릿 안의 `{% generation %}` … `{% endgeneration %}`
# 표시에서 얻으므로, 그 표시가 없는 템플릿(대부분의 모델)에는 쓸 수 없습니다. minilora는 프롬프트만 렌더링한 글과
# 답변까지 렌더링한 글을 비교해 답변을 찾으므로(7.4절) 어떤 템플릿에도 표시가 필요 없습니다. 또 패킹할 때
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
# `instruct.jsonl`은 Alpaca 형식입니다: `instruction`(과제), `input`(선택: 추가 입력), `output`(배울 답).
# `record_to_messages`는 이것을 사용자 턴과 어시스턴트 턴으로 이루어진 대화로 바꿉니다. `input`이 있으면
# 지시 뒤에 빈 줄을 두고 붙입니다. 원래 Alpaca 프롬프트의 머리말("Below is an instruction...")은 쓰지 않습니다.
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
# ## 7.4 답변만 학습하기 · Response-only loss
#
# **한국어**
#
# 프롬프트(사용자 질문과 템플릿 표시)까지 학습하면 모델은 질문을 지어내는 법도 배우게 됩니다. 보통은 답변만
# 학습합니다: 답변 토큰은 `labels`에 자기 id를 그대로 두고, 나머지는 -100으로 바꿔 손실에서 뺍니다.
# `tokenize_conversation`은 답변의 위치를 템플릿 자체에서 찾습니다. `add_generation_prompt=True`로 렌더링한
# 프롬프트 바로 뒤부터, 답변과 그것을 닫는 `<end_of_turn>`까지입니다. `<end_of_turn>`도 학습해야 모델이
# **멈추는 법**을 배웁니다.
#
# 아래에서 ⟦ ⟧ 안이 학습되는 부분입니다.
#
# **English**
#
# Training on the prompt too (the user's question and the template's markers) would also teach the model to invent
# questions. The usual choice is to train on the answer only: answer tokens keep their id as label, every other
# position gets -100 and drops out of the loss. `tokenize_conversation` finds the answer from the template itself:
# it starts right after the prompt rendered with `add_generation_prompt=True` and runs through the `<end_of_turn>`
# that closes it. `<end_of_turn>` is trained too: that is how the model learns to **stop**.
#
# Below, the part inside ⟦ ⟧ is trained.

# %%
def show_trained(sample: dict) -> str:
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
# `mode="sft"`로 바꾸면 `train()`은 위의 과정을 그대로 밟습니다: 레코드 → 대화 → 템플릿 렌더링 → 답변만 라벨
# → (선택) 패킹. 나머지(LoRA, AdamW, 스케줄, 검증, 저장)는 6장과 같습니다.
#
# **English**
#
# With `mode="sft"`, `train()` follows exactly the steps above: records → conversations → template rendering →
# response-only labels → (optional) packing. The rest (LoRA, AdamW, schedule, validation, saving) is chapter 6's.

# %%
RUN = run_dir("07_instruct_finetuning")
shutil.rmtree(RUN, ignore_errors=True)
config = TrainConfig(
    model=str(MODEL_DIR), data=str(INSTRUCT), mode="sft", method="lora", packing=True,
    r=16, alpha=32.0, dropout=0.05, targets="all-linear",
    block_size=MAX_LEN, val_fraction=VAL_FRACTION, batch_size=4, lr=2e-3, warmup_steps=_course.steps(10, 1),
    max_steps=_course.steps(100, 4), eval_every=_course.steps(20, 0), log_every=_course.steps(20, 1),
    output=str(RUN), seed=0, device="auto",
)
print(config.to_toml())
t_train = time.time()
final = train(config)
print(f"\ntrain() took {time.time() - t_train:.1f} s")

# %%
metrics = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines()]
train_curve = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
val_curve = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
print(f"validation loss on the answers {val_curve[0][1]:.4f} -> {val_curve[-1][1]:.4f} "
      f"(perplexity {math.exp(val_curve[0][1]):.1f} -> {math.exp(val_curve[-1][1]):.1f})")
if not FAST:  # a few steps on the fast mode's barely pre-trained model prove nothing about quality
    assert val_curve[-1][1] < val_curve[0][1]
figure = line_chart({"train loss": train_curve, "validation loss": val_curve},
                    _course.figure_path("07_instruct_finetuning_loss.svg"),
                    title="Instruct fine-tuning (response-only loss, packed)", xlabel="optimizer step",
                    ylabel="loss (nats/answer token)")
_course.show_figure(figure)

# %% [markdown]
# ### 과적합과 가장 좋은 체크포인트 · Overfitting and the best checkpoint
#
# **한국어** — 학습 손실은 계속 내려가는데 검증 손실이 어느 스텝부터 다시 오른다면, 모델이 108개의 학습 대화를
# 외우기 시작한 것입니다(**과적합**). 데이터가 작고 LoRA(r = 16, all-linear)가 그것을 외우기에 충분히 크기 때문에
# 흔히 생깁니다. 고치는 방법은 두 가지입니다. 검증 손실이 가장 낮았던 스텝까지만 학습하거나(`max_steps`를 줄이기),
# 주기적으로 검증하면서 **가장 낮은 검증 손실의 체크포인트**를 남기는 것입니다(연습 7.2). 아래 셀은 그 스텝을 곡선에서
# 계산하고, 마지막 스텝과 비교합니다. 빠른 모드에서는 검증을 끝에서 한 번만 하므로 비교할 곡선이 없습니다.
#
# **English** — If the training loss keeps falling while the validation loss turns up from some step on, the model
# has begun to memorise its 108 training conversations (**overfitting**): common here, because the data is small and
# LoRA (r = 16, all-linear) has room enough to memorise it. Two fixes: train only up to the step of the lowest
# validation loss (a smaller `max_steps`), or evaluate periodically and **keep the checkpoint with the lowest
# validation loss** (exercise 7.2). The cell below computes that step from the curve and compares it with the last
# step. In fast mode validation runs once, at the end, so there is no curve to compare.

# %%
best_at, best_val = min(val_curve, key=lambda step_loss: step_loss[1])
last_at, last_val = val_curve[-1]
print(f"lowest validation loss {best_val:.4f} at step {best_at}; last {last_val:.4f} at step {last_at}")
if best_at < last_at:
    print(f"the validation loss rose by {last_val - best_val:+.4f} after step {best_at}: overfitting; "
          f"max_steps={best_at} (or keeping the step-{best_at} checkpoint) gives the better adapter")
else:
    print("no rise: the lowest validation loss is the last one (no overfitting within this run)")

# %% [markdown]
# ## 7.7 학습된 모델과 대화하기 · Chatting with the result
#
# **한국어**
#
# 대화할 때도 학습 때와 같은 템플릿을 씁니다: 지금까지의 대화를 `add_generation_prompt=True`로 렌더링하면
# `<start_of_turn>model\n`로 끝나고, 모델은 답을 이어 씁니다. 생성은 `<end_of_turn>`(또는 `<eos>`)이 나오면
# 멈춥니다. 베이스 모델은 평범한 글로만 사전학습되어서 `<end_of_turn>`을 한 번도 본 적이 없습니다. 인스트럭트
# 파인튜닝으로 "답을 쓰고 `<end_of_turn>`으로 차례를 끝내는" 형식을 배웁니다.
#
# 이 모델은 아주 작아서 사실을 정확히 답하지는 못합니다. 작은 모델은 사실보다 **형식**을 먼저 배웁니다.
# 그래서 두 가지를 잽니다: 답이 어떻게 끝났는지(`<end_of_turn>`, `<eos>`, 또는 길이 제한에서 잘림), 그리고
# 검증 대화의 정답 바로 뒤에서 모델이 `<end_of_turn>`에 주는 확률(멈출 줄 아는가)의 평균입니다.
#
# **English**
#
# Chatting uses the training template too: the conversation so far, rendered with `add_generation_prompt=True`,
# ends in `<start_of_turn>model\n`, and the model writes the answer. Generation stops at `<end_of_turn>` (or
# `<eos>`). The base model was pre-trained on plain text and has never seen `<end_of_turn>`; instruct fine-tuning
# teaches it the format "write the answer, then end the turn with `<end_of_turn>`".
#
# This model is far too small to get the facts right: small models learn the **format** before the facts. So we
# measure two things: how each reply ended (`<end_of_turn>`, `<eos>`, or cut off at the length limit), and the mean
# probability the model gives to `<end_of_turn>` right after the reference answer of the validation conversations
# (does it know when to stop?).

# %%
tuned = load_model(MODEL_DIR)
load_adapter(tuned, RUN / "adapter")
tuned.eval()  # dropout off for measuring (load_model already returns eval mode, and LoRA layers follow it)
END = tokenizer.token_to_id("<end_of_turn>")


@torch.no_grad()
def chat(model, messages: list[dict], max_new_tokens: int = 48) -> tuple[str, str]:
    """The model's reply to `messages`, and how it ended: "<end_of_turn>", "<eos>" or "cut off"."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=tokenizer.eos_token_ids)
    new = out[0, len(ids):].tolist()
    ended = tokenizer.id_to_token(new[-1]) if new and new[-1] in tokenizer.eos_token_ids else "cut off"
    return tokenizer.decode(new, skip_special_tokens=True).strip(), ended


@torch.no_grad()
def p_end_of_turn(model, conversations) -> float:
    """Mean probability of <end_of_turn> right after each reference answer."""
    probs = []
    for _, conv in conversations:
        text = tokenizer.render_chat(conv[:1], add_generation_prompt=True) + conv[1]["content"].strip()
        logits = model(torch.tensor([tokenizer.encode(text, add_special_tokens=False)]))[0, -1]  # (V,)
        probs.append(logits.softmax(-1)[END].item())
    return sum(probs) / len(probs)


endings = {"base": [], "tuned": []}
for where, conv in val_conv[:3] + train_conv[:1]:
    question = conv[:1]
    print(f"\n[{'validation' if (where, conv) in val_conv else 'training'}] user: {question[0]['content']}")
    for name, m in (("base", model), ("tuned", tuned)):
        reply, ended = chat(m, question)
        endings[name].append(ended)
        print(f"  {name:5s} [{ended}]: {reply}")
    print(f"  reference: {conv[1]['content']}")

p_base, p_tuned = p_end_of_turn(model, val_conv), p_end_of_turn(tuned, val_conv)
print()
for name in endings:
    print(f"{name:5s}: replies ended by <end_of_turn> {endings[name].count('<end_of_turn>')}/{len(endings[name])}")
print(f"mean P(<end_of_turn> | reference answer) over {len(val_conv)} validation conversations: "
      f"base {p_base:.2e} -> tuned {p_tuned:.2e}")
if not FAST:  # quality checks need the fully pre-trained default model and the full run
    assert p_tuned > p_base
    assert endings["tuned"].count("<end_of_turn>") >= endings["base"].count("<end_of_turn>")

# %% [markdown]
# **한국어**
#
# 여러 턴 대화도 같은 방식입니다. 모델의 답을 `assistant` 메시지로 대화에 붙이고 다음 질문을 더해서 다시
# 렌더링하면 됩니다.
#
# **English**
#
# A multi-turn chat works the same way: append the model's answer as an `assistant` message, add the next question,
# and render again.

# %%
dialogue = [{"role": "user", "content": "하늘 차밭은 어디에 있나요?"}]
reply, _ = chat(tuned, dialogue)
dialogue += [{"role": "assistant", "content": reply}, {"role": "user", "content": "누가 세웠나요?"}]
reply2, _ = chat(tuned, dialogue)
print(tokenizer.render_chat(dialogue + [{"role": "assistant", "content": reply2}]))
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
