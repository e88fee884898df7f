"""minilora.sft: record formats, response-only labels for every template family, packing without leakage.

The trained tokens are shown per family as the exact text they decode to; transformers checks the token ids
(apply_chat_template) and, on templates written here with `{% generation %}` markers, the mask itself
(return_assistant_tokens_mask). The packed-batch loss is checked against the same samples run one by one.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES
from tiny_tokenizers import build_byte_level_bpe, build_metaspace_bpe, set_chat_template

from minilora.data import IGNORE_INDEX, pad_collate
from minilora.errors import MiniloraError
from minilora.sft import (SFTFields, SFTStats, build_sft_samples, detect_format, load_conversations,
                          load_sft_data, pack_samples, record_to_messages, tokenize_conversation)
from minilora.tokenizer import load_tokenizer

# The templates of this project (not the fixtures): a ChatML and a Gemma-like one.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_LIKE = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
              "else m['role'] %}{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

MULTI = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "  Paris.  "},  # spaces show which templates trim the reply
         {"role": "user", "content": "한국의 수도는?"},
         {"role": "assistant", "content": "서울입니다."}]
SYSTEM = [{"role": "system", "content": "Answer briefly."}] + MULTI

# Exactly what each family trains on for MULTI: one string per assistant turn, the decoded trained tokens (byte-
# level tokenizer, so decoding is exact). Reply as the template writes it, then its end-of-turn marker.
TRAINED = {
    "gemma": ["Paris.<end_of_turn>", "서울입니다.<end_of_turn>"],
    "gemma-2": ["Paris.<end_of_turn>", "서울입니다.<end_of_turn>"],
    "gemma-3": ["Paris.<end_of_turn>", "서울입니다.<end_of_turn>"],
    "llama-2-chat": [" Paris. </s>", " 서울입니다. </s>"],  # ' ' + content.strip() + ' ' + eos
    "llama-3-instruct": ["Paris.<|eot_id|>", "서울입니다.<|eot_id|>"],
    "llama-3.1-instruct": ["Paris.<|eot_id|>", "서울입니다.<|eot_id|>"],
    "llama-3.2-instruct": ["Paris.<|eot_id|>", "서울입니다.<|eot_id|>"],
    "mistral-instruct-v0.1-legacy": ["  Paris.  </s>", "서울입니다.</s>"],  # content + eos (+ ' ', not trained)
    "mistral-instruct-v0.1": ["   Paris.  </s>", " 서울입니다.</s>"],  # ' ' + content + eos
    "mistral-instruct-v0.2": ["  Paris.  </s>", "서울입니다.</s>"],
    "mistral-instruct-v0.3": [" Paris.</s>", " 서울입니다.</s>"],  # ' ' + content.strip() + eos
    "qwen2-instruct": ["  Paris.  <|im_end|>", "서울입니다.<|im_end|>"],
    "qwen2.5-instruct": ["  Paris.  <|im_end|>", "서울입니다.<|im_end|>"],
    "smollm2-instruct": ["  Paris.  <|im_end|>", "서울입니다.<|im_end|>"],
    # Phi-3 writes eos_token after the last turn only: the final reply trains on it too.
    "phi-3-mini": ["  Paris.  <|end|>", "서울입니다.<|end|>\n<|endoftext|>"],
    "phi-3.5-mini": ["  Paris.  <|end|>", "서울입니다.<|end|>\n<|endoftext|>"],
    "zephyr": ["  Paris.  </s>", "서울입니다.</s>"],
    "tinyllama-chat": ["  Paris.  </s>", "서울입니다.</s>"],
    "vicuna-style": [" Paris.</s>", " 서울입니다.</s>"],
    "alpaca-style": ["Paris.", "서울입니다."],  # no end-of-turn marker in this template
}
NO_SYSTEM_ROLE = {"gemma", "gemma-2", "mistral-instruct-v0.1-legacy", "mistral-instruct-v0.2"}


def fixture(family):
    path = FIXTURES / "chat_templates" / f"{family}.json"
    if not path.is_file():
        pytest.skip(f"fixture {path} not present")
    return json.loads(path.read_text())


def trained_runs(tokenizer, sample) -> list[str]:
    """The decoded maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(r) for r in runs]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"byte": build_byte_level_bpe(root / "byte"), "metaspace": build_metaspace_bpe(root / "metaspace")}


def with_template(bases, kind, tmp_path, template, bos=None, eos=None):
    folder = tmp_path / kind
    shutil.copytree(bases[kind], folder)
    return set_chat_template(folder, template, bos, eos)


def auto_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------------------
# Response-only labels, per template family
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(TRAINED))
@pytest.mark.parametrize("kind", ["byte", "metaspace"])
def test_trained_tokens_per_family(bases, tmp_path, family, kind):
    fx = fixture(family)
    path = with_template(bases, kind, tmp_path, fx["chat_template"], fx["bos_token"], fx["eos_token"])
    tok = load_tokenizer(path)
    sample = tokenize_conversation(tok, MULTI)
    expected = TRAINED[family]
    if kind == "metaspace":  # Llama's decoder drops one leading space of any decoded text
        expected = [e[1:] if e.startswith(" ") else e for e in expected]
    assert trained_runs(tok, sample) == expected
    assert sample["input_ids"] == auto_tokenizer(path).apply_chat_template(MULTI, return_dict=False)

    if family not in NO_SYSTEM_ROLE:  # the system prompt is never trained; the replies are the same
        with_system = tokenize_conversation(tok, SYSTEM)
        assert trained_runs(tok, with_system) == expected
        assert with_system["input_ids"] == auto_tokenizer(path).apply_chat_template(SYSTEM, return_dict=False)


# (our template, the same template with {% generation %} markers for transformers' assistant mask)
MARKED = {
    "chatml": (CHATML, "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == "
               "'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
               "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "gemma_like": (GEMMA_LIKE, "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == "
                   "'assistant' else m['role'] %}{{ '<start_of_turn>' + role + '\n' }}{% if m['role'] == "
                   "'assistant' %}{% generation %}{{ m['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
                   "{{ '\n' }}{% else %}{{ m['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "inst_like": ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content']"
                  ".strip() + ' [/INST]' }}{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}"
                  "{% endfor %}",
                  "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content']"
                  ".strip() + ' [/INST]' }}{% else %}{% generation %}{{ ' ' + m['content'].strip() + ' ' + "
                  "eos_token }}{% endgeneration %}{% endif %}{% endfor %}"),
}


@pytest.mark.parametrize("name", sorted(MARKED))
@pytest.mark.parametrize("kind", ["byte", "metaspace"])
def test_mask_equals_transformers_generation_mask(bases, tmp_path, name, kind):
    """Our mask, found from the plain template, equals transformers' mask from the template with markers."""
    plain, marked = MARKED[name]
    path = with_template(bases, kind, tmp_path, plain, "<s>", "</s>")
    tok, hf = load_tokenizer(path), auto_tokenizer(path)
    for messages in (MULTI, MULTI[:2], [*MULTI, {"role": "user", "content": "Thanks!"}]):
        sample = tokenize_conversation(tok, messages)
        out = hf.apply_chat_template(messages, chat_template=marked, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert sample["input_ids"] == out["input_ids"]
        assert [int(label != IGNORE_INDEX) for label in sample["labels"]] == out["assistant_masks"]


def test_train_on_prompt_trains_everything(bases, tmp_path):
    tok = load_tokenizer(with_template(bases, "byte", tmp_path, CHATML))
    sample = tokenize_conversation(tok, MULTI, train_on_prompt=True)
    assert sample["labels"] == sample["input_ids"] == tok.apply_chat_template(MULTI)


# ----------------------------------------------------------------------------------------------------------
# Record formats
# ----------------------------------------------------------------------------------------------------------
def test_alpaca_record_to_messages():
    fields = SFTFields()
    assert record_to_messages({"instruction": "Translate.", "input": "안녕", "output": "Hello"}, "alpaca") == [
        {"role": "user", "content": "Translate.\n\n안녕"}, {"role": "assistant", "content": "Hello"}]
    record = {"instruction": "Say hi.", "input": "  ", "output": "Hi", "system": "Be kind."}
    assert record_to_messages(record, detect_format(record, fields)) == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi"}]


def test_messages_and_sharegpt_records():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
    assert detect_format({"messages": messages}) == "messages"
    assert record_to_messages({"messages": messages}, "messages") == messages
    share = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"},
                               {"from": "gpt", "value": "A"}]}
    assert detect_format(share) == "sharegpt" and record_to_messages(share, "sharegpt") == messages
    custom = SFTFields(conversations="turns", speaker="who", value="text")
    record = {"turns": [{"who": "user", "text": "U"}, {"who": "model", "text": "A"}]}
    assert record_to_messages(record, detect_format(record, custom), custom) == messages[1:]


@pytest.mark.parametrize("record, fmt, message", [
    ({"instruction": "x"}, "alpaca", "missing field 'output'"),
    ({"instruction": "x", "output": 3}, "alpaca", "field 'output' should be a string"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, "messages", "missing field 'content'"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "system", "value": "s"}]}, "sharegpt",
     "system message may only come first"),
])
def test_malformed_records(record, fmt, message):
    with pytest.raises(ValueError, match=message):
        record_to_messages(record, fmt)


def test_load_conversations_stop_or_skip(tmp_path):
    path = tmp_path / "d.jsonl"
    good = {"instruction": "Add 2 and 2.", "output": "4"}
    path.write_text("\n".join(json.dumps(r) for r in [good, {"instruction": "no output"}, good]) + "\n")
    with pytest.raises(MiniloraError, match=r"d\.jsonl:2: malformed alpaca record: missing field 'output'"):
        load_conversations(path)
    stats = SFTStats()
    conversations = load_conversations(path, on_error="skip", stats=stats)
    assert [where.rsplit(":", 1)[1] for where, _ in conversations] == ["1", "3"]
    assert (stats.records, stats.skipped) == (3, 1) and "d.jsonl:2" in stats.examples[0]
    path.write_text(json.dumps({"prompt": "?", "completion": "!"}) + "\n")
    with pytest.raises(MiniloraError, match=r"d\.jsonl:1: cannot tell the record format .*prompt, completion"):
        load_conversations(path)


def test_template_rejection_is_a_malformed_record(bases, tmp_path):
    fx = fixture("gemma")  # raises on a system message
    tok = load_tokenizer(with_template(bases, "byte", tmp_path, fx["chat_template"], "<bos>", "<eos>"))
    conversations = [("f.jsonl:1", MULTI), ("f.jsonl:2", SYSTEM)]
    with pytest.raises(MiniloraError, match="f.jsonl:2: .*System role not supported"):
        build_sft_samples(tok, conversations, max_len=100)
    stats = SFTStats()
    assert len(build_sft_samples(tok, conversations, max_len=100, on_error="skip", stats=stats)) == 1
    assert stats.skipped == 1


# ----------------------------------------------------------------------------------------------------------
# Truncation and packing
# ----------------------------------------------------------------------------------------------------------
def test_truncate_or_drop_overlong(bases, tmp_path):
    tok = load_tokenizer(with_template(bases, "byte", tmp_path, CHATML))
    full = tokenize_conversation(tok, MULTI)
    n = len(full["input_ids"])
    first_reply_end = max(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX and i < n // 2 + 5)
    conversations = [("a", MULTI), ("b", MULTI[:2])]
    stats = SFTStats()
    samples = build_sft_samples(tok, conversations, max_len=n - 3, stats=stats)
    assert stats.truncated == 1 and samples[0] == {k: v[:n - 3] for k, v in full.items()}
    stats = SFTStats()
    samples = build_sft_samples(tok, conversations, max_len=n - 3, overlong="drop", stats=stats)
    assert stats.dropped_overlong == 1 and len(samples) == 1
    stats = SFTStats()  # cut before the first reply: nothing left to learn, dropped
    samples = build_sft_samples(tok, conversations, max_len=5, stats=stats)
    assert samples == [] and stats.dropped_no_target == 2 and stats.truncated == 2
    assert first_reply_end > 5


def test_pack_samples_by_hand():
    samples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
               {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]}, {"input_ids": [10], "labels": [10]}]
    rows = pack_samples(samples, max_len=5)
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "segment_ids": [1, 1, 1, 2, 2],
         "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9, 10], "labels": [-100, -100, 8, 9, -100], "segment_ids": [1, 1, 1, 1, 2],
         "position_ids": [0, 1, 2, 3, 0]}]
    # best fit: sample 3 fills row 0, sample 4 fits no row and opens row 2, sample 5 fills the tightest (row 1)
    rows = pack_samples([{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([3, 4, 2, 3, 1], 1)], 5)
    assert [r["input_ids"] for r in rows] == [[1, 1, 1, 3, 3], [2, 2, 2, 2, 5], [4, 4, 4]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_samples(samples, max_len=3)


@pytest.mark.parametrize("max_len", [56, 81, 300])  # samples are 28 and 52 tokens long
def test_packing_keeps_every_token(bases, tmp_path, max_len):
    tok = load_tokenizer(with_template(bases, "byte", tmp_path, GEMMA_LIKE, "<bos>", "<eos>"))
    conversations = [(str(i), MULTI[: 2 + 2 * (i % 2)]) for i in range(9)]
    samples = build_sft_samples(tok, conversations, max_len=max_len)
    rows = pack_samples(samples, max_len)
    assert all(len(r["input_ids"]) <= max_len for r in rows) and len(rows) < len(samples)
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for s in samples for t in s["input_ids"])
    assert sum(max(r["segment_ids"]) for r in rows) == len(samples)
    trained = sum(label != IGNORE_INDEX for s in samples for label in s["labels"][1:])
    assert sum(label != IGNORE_INDEX for r in rows for label in r["labels"]) == trained
    batch = pad_collate(rows, pad_id=tok.pad_token_id or 0)
    assert batch["input_ids"].shape == (len(rows), max(len(r["input_ids"]) for r in rows))
    assert torch.equal(batch["attention_mask"].bool(), batch["segment_ids"] > 0)


def test_load_sft_data_end_to_end(bases, tmp_path):
    path = with_template(bases, "byte", tmp_path, CHATML)
    tok = load_tokenizer(path)
    data = tmp_path / "sft.jsonl"
    records = [{"instruction": f"What is {i} plus {i}?", "output": f'{{"answer": {2 * i}}}'} for i in range(10)]
    records.insert(4, {"instruction": "broken"})
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    train, val, stats = load_sft_data(data, tok, max_len=64, val_fraction=0.2, on_error="skip", packing=True)
    assert stats.skipped == 1 and stats.samples == 10 and "10 samples from 11 records" in stats.summary()
    assert all(len(r["input_ids"]) <= 64 for r in train + val) and "segment_ids" in train[0]
    assert sum(max(r["segment_ids"]) for r in train) == 8 and sum(max(r["segment_ids"]) for r in val) == 2
    no_template = load_tokenizer(bases["byte"])
    with pytest.raises(MiniloraError, match="has no chat template"):
        load_sft_data(data, no_template, max_len=64)


# ----------------------------------------------------------------------------------------------------------
# The model: a packed batch has the loss of its samples run one by one
# ----------------------------------------------------------------------------------------------------------
def _loss_sum(logits, labels):
    """Summed next-token cross-entropy over counted labels, and their count (computed with torch directly)."""
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets,
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])  # gemma2/qwen2: sliding window 8 inside rows
def test_packed_loss_equals_samples_one_by_one(tmp_path, family):
    checkpoint = pytest.importorskip("minilora.formats.safetensors_folder")
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(family, tmp_path / "model", tokenizer="llama3")
    set_chat_template(path, GEMMA_LIKE, "<bos>", "<eos>")
    tok, model = load_tokenizer(path), checkpoint.load_model(path)
    conversations = [(str(i), MULTI[: 2 + 2 * (i % 2)]) for i in range(5)]
    samples = build_sft_samples(tok, conversations, max_len=80)
    rows = pack_samples(samples, max_len=80)
    assert len(rows) < len(samples)  # really packed

    with torch.no_grad():
        batch = pad_collate(rows, pad_id=0)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
        packed, packed_n = _loss_sum(logits, batch["labels"])
        single, single_n = 0.0, 0
        for s in samples:
            loss, n = _loss_sum(model(torch.tensor([s["input_ids"]])), torch.tensor([s["labels"]]))
            single, single_n = single + loss, single_n + n
        assert packed_n == single_n
        torch.testing.assert_close(packed / packed_n, single / single_n, rtol=1e-5, atol=1e-6)

        # The check has teeth: attention across samples (no segment ids) changes the loss.
        leaky = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"])
        assert abs(_loss_sum(leaky, batch["labels"])[0] / packed_n - packed / packed_n) > 1e-3


def test_unreadable_jsonl_lines_are_skipped_with_on_error_skip(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = '{"instruction": "Say hi", "input": "", "output": "hi"}'
    path.write_text(f'{good}\n{{not json\n[1, 2]\n{good}\n', encoding="utf-8")
    with pytest.raises(MiniloraError, match=r"mixed.jsonl:2: not valid JSON"):
        load_conversations(path)
    stats = SFTStats()
    conversations = load_conversations(path, on_error="skip", stats=stats)
    assert [where.rsplit(":", 1)[1] for where, _ in conversations] == ["1", "4"]
    assert (stats.records, stats.skipped) == (4, 2)


# ----------------------------------------------------------------------------------------------------------
# Bad input: a counted skip or a clear error; inputs that train but not as meant: a warning
# ----------------------------------------------------------------------------------------------------------
GOOD = '{"instruction": "Say hi", "output": "hi"}'


@pytest.mark.parametrize("line, problem", [
    ('{"instruction": "Smile \\ud83d", "output": "ok"}', "holds a lone UTF-16 surrogate \\ud83d"),
    ('{"instruction": "x", "output": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply to read"),
])
def test_undecodable_records_are_skippable(tmp_path, line, problem):
    """Both crashed even with on_error='skip' (a tokenizer exception / a RecursionError)."""
    path = tmp_path / "d.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(MiniloraError) as e:
        load_conversations(path)
    assert str(e.value).startswith(f"{path}:2: {problem}")
    stats = SFTStats()
    conversations = load_conversations(path, on_error="skip", stats=stats)
    assert [where.rsplit(":", 1)[1] for where, _ in conversations] == ["1", "3"]
    assert (stats.records, stats.skipped) == (3, 1) and stats.examples[0].startswith(f"{path}:2: {problem}")


def _sft_file(tmp_path, records) -> str:
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_empty_assistant_reply_is_warned_about(bases, tmp_path):
    tok = load_tokenizer(with_template(bases, "byte", tmp_path, CHATML))
    records = [{"instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(6)]
    records[2]["output"], records[4]["output"] = "", " \n\t"
    data = _sft_file(tmp_path, records)
    _, _, stats = load_sft_data(data, tok, max_len=64, val_fraction=0)
    assert stats.empty_replies == 2
    assert stats.warnings == [f"2 assistant replies are empty or whitespace only (the first at {data}:3): they "
                              "teach the model to answer nothing; fix or remove them"]
    _, _, clean = load_sft_data(_sft_file(tmp_path, records[:2]), tok, max_len=64, val_fraction=0)
    assert clean.warnings == [] and clean.empty_replies == 0


ALPACA = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
          "{% else %}{{ '### Response:\n' + m['content'] + '\n\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}")


@pytest.mark.parametrize("template, warned", [
    (ALPACA, True),  # the reply ends with plain text: no token teaches the model to stop
    (ALPACA.replace("m['content'] + '\n\n' }}{% endif %}", "m['content'] + eos_token + '\n\n' }}{% endif %}"),
     False),
    (CHATML, False),  # <|im_end|>
    (GEMMA_LIKE, False),  # <end_of_turn>
])
def test_template_without_end_of_turn_is_warned_about(bases, tmp_path, template, warned):
    tok = load_tokenizer(with_template(bases, "byte", tmp_path, template, "<bos>", "<eos>"))
    records = [{"instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(4)]
    train, _, stats = load_sft_data(_sft_file(tmp_path, records), tok, max_len=64, val_fraction=0)
    eos_trained = any(label in tok.eos_token_ids or tok.id_to_token(label) in ("<|im_end|>", "<end_of_turn>")
                      for s in train for label in s["labels"] if label != IGNORE_INDEX)
    assert eos_trained is not warned  # the warning says exactly whether an end token is trained
    assert any("writes no end-of-turn or EOS token" in w for w in stats.warnings) is warned


def test_overlong_record_is_refused_or_a_counted_skip(bases, tmp_path):
    from minilora.sft import MAX_RECORD_CHARS

    tok = load_tokenizer(with_template(bases, "byte", tmp_path, CHATML))
    huge = {"instruction": "Repeat.", "output": "a" * (MAX_RECORD_CHARS - len("Repeat.") + 1)}  # 1 char over
    fits = {"instruction": "Repeat.", "output": "a" * (MAX_RECORD_CHARS - len("Repeat."))}
    conversations = [("d.jsonl:1", record_to_messages(huge, "alpaca")), ("d.jsonl:2", MULTI)]
    with pytest.raises(MiniloraError, match=r"d\.jsonl:1: the record has 1,000,001 characters, over the limit of "
                                            r"1,000,000 \(sft\.MAX_RECORD_CHARS"):
        build_sft_samples(tok, conversations, max_len=64)
    stats = SFTStats()
    assert len(build_sft_samples(tok, conversations, max_len=64, on_error="skip", stats=stats)) == 1
    assert stats.skipped == 1 and "over the limit" in stats.examples[0]
    assert len(build_sft_samples(tok, [("d.jsonl:3", record_to_messages(fits, "alpaca"))], max_len=64)) == 1


RSS_SCRIPT = """
import json, resource, sys
from minilora.sft import load_sft_data
from minilora.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_, _, stats = load_sft_data(sys.argv[2], tok, max_len=64, val_fraction=0, on_error="skip")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_mib": (after - before) / 1024, "skipped": stats.skipped, "samples": stats.samples}))
"""


def test_a_20_mb_reply_costs_bounded_memory(bases, tmp_path):
    """A 50 MB reply took 9 GB of RSS (~180 bytes per character); a 20 MB one now costs its text a few times
    over (file, line, decoded string), not a tokenisation. Peak RSS measured in a fresh process (ru_maxrss)."""
    import subprocess
    import sys

    pytest.importorskip("resource")
    tok_dir = with_template(bases, "byte", tmp_path, CHATML)
    data = _sft_file(tmp_path, [{"instruction": "Say hi", "output": "hi"},
                                {"instruction": "Recite.", "output": "tea and rice " * 1_600_000}])  # 20.8 MB
    run = subprocess.run([sys.executable, "-P", "-c", RSS_SCRIPT, str(tok_dir), str(data)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (result["skipped"], result["samples"]) == (1, 1)
    assert result["grew_mib"] < 250, result  # a tokenised 20 MB record: ~3,600 MiB


def test_the_run_prints_the_warnings(tmp_path, capsys):
    from tiny_models import make_tiny_checkpoint

    from minilora.config import load_config
    from minilora.train_config import TrainConfig
    from minilora.train_data import build_datasets

    model = make_tiny_checkpoint("llama", tmp_path / "model", tokenizer="llama3")
    set_chat_template(model, ALPACA, "<bos>", "<eos>")
    records = [{"instruction": f"What is {i} plus {i}?", "output": str(2 * i) if i else " "} for i in range(6)]
    cfg = TrainConfig(model=str(model), data=str(_sft_file(tmp_path, records)), mode="sft", block_size=64,
                      val_fraction=0, device="cpu")
    build_datasets(cfg, load_tokenizer(model), load_config(model))
    out = capsys.readouterr().out
    assert "warning: 1 assistant replies are empty or whitespace only" in out
    assert "warning: the chat template of" in out and "writes no end-of-turn or EOS token" in out
