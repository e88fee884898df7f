"""minilora.data: reading text files, packing blocks, the padding collator, the seeded split and epoch order.

Expectations are hand-computed on small inputs; the padding collator is also checked against transformers'
DataCollatorForSeq2Seq (right padding, labels padded with -100), and blocks against a tokenizer trained here.
"""

import json

import pytest
import torch
from tiny_tokenizers import build_byte_level_bpe

from minilora.data import (IGNORE_INDEX, epoch_order, load_base_data, load_texts, pack_into_blocks, pad_collate,
                           pad_id, read_records, split_train_val, tokenize_documents)
from minilora.errors import MiniloraError
from minilora.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {s: load_tokenizer(build_byte_level_bpe(root / s, style=s)) for s in ("llama3", "qwen2")}


# ----------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------
def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First doc,\nstill first.\n\nSecond doc.\n   \n\n\n두 번째 아닌 세 번째 문서.\r\n\r\nFourth.\n",
                    encoding="utf-8")
    assert load_texts(path) == ["First doc,\nstill first.", "Second doc.", "두 번째 아닌 세 번째 문서.", "Fourth."]
    path.write_text("one document\nwithout blank lines", encoding="utf-8")
    assert load_texts(path) == ["one document\nwithout blank lines"]


def test_jsonl_and_json_with_custom_field(tmp_path):
    rows = [{"body": "alpha", "id": 1}, {"body": "베타", "id": 2}, {"body": "", "id": 3}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n",
                                      encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"version": 1, "data": rows}), encoding="utf-8")
    for name in ("a.jsonl", "b.json", "c.json"):
        assert load_texts(tmp_path / name, text_field="body") == ["alpha", "베타"]  # the empty doc is skipped


def test_json_records_know_their_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"meta": {"x": [1, 2]},\n "data": [\n  {"text": "a"},\n\n  {"text": "b",\n   "n": 2},'
                    '  {"text": "c"}\n]}', encoding="utf-8")
    assert [where.rsplit(":", 1)[1] for where, _ in read_records(path)] == ["3", "5", "6"]


@pytest.mark.parametrize("content, suffix, message", [
    ('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', ".jsonl", r"d\.jsonl:3: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x", "id": 7}\n', ".jsonl",
     r"d\.jsonl:2: no field 'text' \(this record has: body, id\)"),
    ('[{"text": "ok"},\n {"txt": "x"}]', ".json", r"d\.json:2: no field 'text' \(this record has: txt\)"),
    ('{"text": ["not", "a", "string"]}\n', ".jsonl", r"d\.jsonl:1: field 'text' should be a string"),
    ('["just a string"]', ".json", r"d\.json:1: expected a JSON object"),
    ('{"rows": []}', ".json", r"expected a JSON list of records"),
    ('[{"text": "a"}, ', ".json", r"d\.json:1: not valid JSON"),
    ('\n\n   \n', ".txt", r"contains no text"),
    ('{"text": "  "}\n', ".jsonl", r"contains no text"),
    ('text', ".xlsx", r"unsupported extension '\.xlsx'"),  # .csv is read since table_files.py
])
def test_bad_files_give_precise_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"d{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MiniloraError, match=message):
        load_texts(path)


def test_missing_file(tmp_path):
    with pytest.raises(MiniloraError, match="not found"):
        load_texts(tmp_path / "absent.txt")


# ----------------------------------------------------------------------------------------------------------
# Packing into blocks
# ----------------------------------------------------------------------------------------------------------
def test_pack_into_blocks_by_hand():
    blocks = pack_into_blocks([[1, 2, 3], [4, 5], [6, 9]], block_size=3, eos_id=9)
    # stream 1 2 3 9 | 4 5 9 6 | 9  -> the doc ending in EOS gets no second EOS; the 1-token rest is dropped
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3], [9, 4, 5], [9, 6, 9]]
    assert all(b["labels"] == b["input_ids"] and b["labels"] is not b["input_ids"] for b in blocks)
    rest = pack_into_blocks([[1, 2, 3, 4]], block_size=3, eos_id=0)
    assert [b["input_ids"] for b in rest] == [[1, 2, 3], [4, 0]]  # a shorter last block is kept


@pytest.mark.parametrize("block_size", [2, 3, 7, 64, 1000])
def test_blocks_cut_the_stream_exactly(block_size):
    docs = [list(range(10 * i, 10 * i + n)) for i, n in enumerate([5, 1, 13, 0, 8])]
    stream = [t for d in docs for t in d + [-1]]
    blocks = [b["input_ids"] for b in pack_into_blocks(docs, block_size, eos_id=-1)]
    assert [t for b in blocks for t in b] == (stream if len(stream) % block_size != 1 else stream[:-1])
    assert all(len(b) == block_size for b in blocks[:-1]) and 2 <= len(blocks[-1]) <= block_size


@pytest.mark.parametrize("style, bos", [("llama3", True), ("qwen2", False)])
def test_documents_get_bos_if_the_tokenizer_adds_it_and_eos_between(tokenizers, style, bos):
    tok = tokenizers[style]
    docs = ["The capital of France is Paris.", "서울은 한국의 수도입니다."]
    ids = tokenize_documents(tok, docs)
    stream = [t for b in pack_into_blocks(ids, 10_000, tok.eos_token_id) for t in b["input_ids"]]
    expected = []
    for doc in docs:
        expected += ([tok.bos_token_id] if bos else []) + tok.encode(doc, add_special_tokens=False)
        expected.append(tok.eos_token_id)
    assert stream == expected
    assert tok.decode(stream, skip_special_tokens=True) == "".join(docs)


def test_load_base_data_splits_documents_not_blocks(tmp_path, tokenizers):
    tok = tokenizers["llama3"]
    docs = [f"Document number {i}: tea is picked in May." for i in range(20)]
    (tmp_path / "train.txt").write_text("\n\n".join(docs), encoding="utf-8")
    train, val = load_base_data(tmp_path / "train.txt", tok, block_size=16, val_fraction=0.2, seed=3)
    text = lambda blocks: tok.decode([t for b in blocks for t in b["input_ids"]], skip_special_tokens=True)  # noqa
    train_text, val_text = text(train), text(val)
    held_out = [d for d in docs if d in val_text]
    assert len(held_out) == 4 and not any(d in train_text for d in held_out)
    assert all(len(b["input_ids"]) == 16 for b in train[:-1])
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "Only validation."}) + "\n", encoding="utf-8")
    train, val = load_base_data(tmp_path / "train.txt", tok, 16, val_path=tmp_path / "val.jsonl")
    assert text(val) == "Only validation." and len(text(train)) == len("".join(docs))


# ----------------------------------------------------------------------------------------------------------
# Padding collator
# ----------------------------------------------------------------------------------------------------------
def test_pad_collate_by_hand():
    batch = pad_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_collate_with_segments():
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "segment_ids": [1, 1, 2, 2],
             "position_ids": [0, 1, 0, 1]}, {"input_ids": [5, 6], "labels": [-100, 6], "segment_ids": [1, 1],
                                             "position_ids": [0, 1]}]
    batch = pad_collate(rows, pad_id=9)
    assert batch["segment_ids"].tolist() == [[1, 1, 2, 2], [1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["input_ids"][1].tolist() == [5, 6, 9, 9] and batch["labels"][1, 2:].tolist() == [-100, -100]


def test_pad_id_falls_back_to_eos(tokenizers):
    assert pad_id(tokenizers["qwen2"]) == tokenizers["qwen2"].token_to_id("<|endoftext|>")  # its pad token
    assert tokenizers["llama3"].pad_token_id is None and pad_id(tokenizers["llama3"]) == tokenizers["llama3"].eos_token_id


@pytest.mark.parametrize("lengths", [[1], [3, 3], [1, 7, 2], [16, 1, 5, 9]])
def test_pad_collate_matches_transformers(tokenizers, lengths):
    transformers = pytest.importorskip("transformers")
    tok = tokenizers["qwen2"]  # has a pad token
    hf_tok = transformers.AutoTokenizer.from_pretrained(tok.name_or_path)
    gen = torch.Generator().manual_seed(len(lengths))
    samples = []
    for n in lengths:
        ids = torch.randint(10, 500, (n,), generator=gen).tolist()
        labels = [IGNORE_INDEX if i % 3 == 0 else t for i, t in enumerate(ids)]
        samples.append({"input_ids": ids, "labels": labels})
    ours = pad_collate(samples, pad_id=tok.pad_token_id)
    oracle = transformers.DataCollatorForSeq2Seq(hf_tok, padding=True, label_pad_token_id=IGNORE_INDEX)(
        [dict(s, attention_mask=[1] * len(s["input_ids"])) for s in samples])
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(ours[key], oracle[key]), key


# ----------------------------------------------------------------------------------------------------------
# Split and order
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, fraction, n_val", [(10, 0.1, 1), (10, 0.25, 2), (3, 0.01, 1), (101, 0.5, 50)])
def test_split_train_val(n, fraction, n_val):
    items = [f"doc{i}" for i in range(n)]
    train, val = split_train_val(items, fraction, seed=1)
    assert len(val) == n_val and sorted(train + val) == sorted(items) and not set(train) & set(val)
    assert train == [x for x in items if x in train] and val == [x for x in items if x in val]  # order kept
    assert split_train_val(items, fraction, seed=1) == (train, val)  # seeded
    if n > 10:
        assert split_train_val(items, fraction, seed=2)[1] != val
    assert split_train_val(items, 0.0) == (items, [])


def test_split_too_small():
    with pytest.raises(MiniloraError, match="only 1 item"):
        split_train_val(["one"], 0.1)


def test_epoch_order_is_a_reproducible_permutation():
    first = epoch_order(50, seed=7, epoch=0)
    assert sorted(first) == list(range(50)) and first == epoch_order(50, seed=7, epoch=0)
    assert epoch_order(50, seed=7, epoch=1) != first and epoch_order(50, seed=8, epoch=0) != first


# ----------------------------------------------------------------------------------------------------------
# Records JSON can decode but minilora cannot use: an error naming the line, or a counted skip
# ----------------------------------------------------------------------------------------------------------
LONE_SURROGATE = '{"text": "smile \\ud83d please"}'  # the file holds the 6 characters \ud83d: half an emoji pair
DEEP = "[" * 100_000 + "]" * 100_000  # 100,000-deep nesting: RecursionError inside json.loads


@pytest.mark.parametrize("line, message", [
    (LONE_SURROGATE, r"d\.jsonl:2: holds a lone UTF-16 surrogate \\ud83d"),
    ('{"text": ' + DEEP + "}", r"d\.jsonl:2: JSON nested too deeply to read"),
])
def test_undecodable_jsonl_records_are_named_or_skipped(tmp_path, tokenizers, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + line + '\n{"text": "also fine \\ud83d\\ude00"}\n', encoding="utf-8")
    with pytest.raises(MiniloraError, match=message):
        load_texts(path)  # base FT: stops, naming the line (was a RecursionError / a tokenizer exception)
    skipped = []
    records = read_records(path, skipped=skipped)
    assert [r["text"] for _, r in records] == ["fine", "also fine 😀"]  # a complete pair is an emoji, kept
    assert len(skipped) == 1 and skipped[0].startswith(f"{path}:2: ")
    tokenize_documents(tokenizers["llama3"], [r["text"] for _, r in records])  # what remains tokenises


def test_deep_nesting_in_a_json_file_is_named(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(DEEP, encoding="utf-8")
    with pytest.raises(MiniloraError, match=r"d\.json: JSON nested too deeply to read"):
        load_texts(path)


def test_lone_surrogate_really_breaks_the_tokenizer(tokenizers):
    """Why the check exists: the tokenizer refuses such a str with an exception that names no file."""
    with pytest.raises(Exception) as e:
        tokenize_documents(tokenizers["llama3"], [json.loads(LONE_SURROGATE)["text"]])
    assert not isinstance(e.value, MiniloraError)


def test_token_ids_past_the_embedding_are_named():
    from minilora.data import check_token_ids

    samples = [{"input_ids": [1, 5, 255]}, {"input_ids": [3, 256, 4]}]
    check_token_ids(samples[:1], 256, "data file d.txt")
    with pytest.raises(MiniloraError, match=r"data file d\.txt: sample 1 holds token id 256, outside the model's "
                                            r"embedding \(ids 0\.\.255, vocab_size in config\.json\)"):
        check_token_ids(samples, 256, "data file d.txt")


def test_long_documents_are_tokenised_in_pieces_with_the_same_ids(tokenizers, monkeypatch):
    """Bounded memory: documents go to the tokenizer at most MAX_TOKENIZE_CHARS characters at a time. For a
    byte-level tokenizer the pieces (cut after a line end) give exactly the ids of the whole text."""
    import minilora.data as data

    monkeypatch.setattr(data, "MAX_TOKENIZE_CHARS", 200)
    lines = ["The capital of France is Paris.", "  indented line", "", "프랑스의 수도는 파리입니다.", "2024년 3.14",
             "Tea <|im_end|> rolled by hand."]
    long_doc = "\n".join(lines[i % len(lines)] for i in range(120))  # ~2,800 characters: 14+ pieces
    docs = ["short one", long_doc, "another short one", "x" * 450]  # the last has no line end: cut where it must
    for style in ("llama3", "qwen2"):
        tok = tokenizers[style]
        ours = tokenize_documents(tok, docs)
        assert ours[:3] == [tok.encode(d) for d in docs[:3]], style  # the oracle: each text encoded whole
        assert len(ours[3]) >= 1
    calls = []
    real = tokenizers["llama3"].encode
    monkeypatch.setattr(tokenizers["llama3"], "encode", lambda t, **k: (calls.append(len(t)), real(t, **k))[1])
    tokenize_documents(tokenizers["llama3"], [long_doc])
    assert max(calls) <= 200 and sum(calls) >= len(long_doc)
