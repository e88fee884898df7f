"""Tables as training data: CSV/TSV (stdlib csv), Parquet, Arrow and save_to_disk folders (pyarrow).

The oracle is the JSONL reader: the same records written as .jsonl and as each table format must give the same
documents (base mode) and the same conversations (SFT), and a malformed row follows the same on-error rules."""

import csv
import json
import sys

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet
import pytest

from minilora.data import load_texts
from minilora.errors import MiniloraError
from minilora.sft import SFTStats, load_conversations

# Awkward on purpose: a comma, quotes, a newline inside a value, Korean, an empty document.
DOCS = ["The river runs past the mill, and the children count \"the boats\".", "강물은 방앗간 옆을 흐른다.\n둘째 줄.",
        "", "In spring the orchard turns white."]
MESSAGES = [
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris, of course."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "한국의 수도는?"},
     {"role": "assistant", "content": "서울."}],
]
ALPACA = [{"instruction": "Capital of France?", "input": "", "output": "Paris, of course."},
          {"instruction": "Translate", "input": "고양이", "output": "cat"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, delimiter=","):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_arrow(path, rows, stream=False):
    table = pa.Table.from_pylist(rows)
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_saved_dataset(folder, rows, shards=2):
    """What datasets.Dataset.save_to_disk writes (datasets is not installed here): Arrow *stream* shards
    data-0000K-of-0000N.arrow, dataset_info.json and state.json listing the shards in order."""
    folder.mkdir()
    names = [f"data-{k:05d}-of-{shards:05d}.arrow" for k in range(shards)]
    per = -(-len(rows) // shards)
    for k, name in enumerate(names):
        write_arrow(folder / name, rows[k * per:(k + 1) * per], stream=True)
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_format_type": None, "_split": None}))
    return folder


TABLES = {
    "csv": lambda p, rows: write_csv(p.with_suffix(".csv"), rows),
    "tsv": lambda p, rows: write_csv(p.with_suffix(".tsv"), rows, delimiter="\t"),
    "parquet": lambda p, rows: pa.parquet.write_table(pa.Table.from_pylist(rows), p.with_suffix(".parquet"))
    or p.with_suffix(".parquet"),
    "arrow-file": lambda p, rows: write_arrow(p.with_suffix(".arrow"), rows),
    "arrow-stream": lambda p, rows: write_arrow(p.with_suffix(".arrow"), rows, stream=True),
    "save_to_disk": lambda p, rows: write_saved_dataset(p, rows),
}
NESTED = [k for k in TABLES if k not in ("csv", "tsv")]  # CSV has no lists


@pytest.mark.parametrize("kind", TABLES)
def test_base_mode_reads_the_text_column_like_jsonl(tmp_path, kind):
    rows = [{"id": i, "text": d} for i, d in enumerate(DOCS)]
    expected = load_texts(write_jsonl(tmp_path / "d.jsonl", rows))
    assert expected == [DOCS[0], DOCS[1], DOCS[3]]  # the empty document is skipped
    assert load_texts(TABLES[kind](tmp_path / "d", rows)) == expected


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_text_field_names_the_column_and_a_missing_one_lists_the_columns(tmp_path, kind):
    path = TABLES[kind](tmp_path / "d", [{"title": "t", "body": d} for d in DOCS])
    assert load_texts(path, text_field="body") == [DOCS[0], DOCS[1], DOCS[3]]
    with pytest.raises(MiniloraError, match=r"row 0|d\.csv:2") as e:
        load_texts(path)
    assert "no field 'text' (this record has: title, body)" in str(e.value) and "--text-field" in str(e.value)


@pytest.mark.parametrize("kind", NESTED)
@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_sft_reads_messages_and_sharegpt_tables_like_jsonl(tmp_path, kind, fmt):
    if fmt == "messages":
        rows = [{"messages": m} for m in MESSAGES]
    else:
        speaker = {"user": "human", "assistant": "gpt", "system": "system"}
        rows = [{"conversations": [{"from": speaker[t["role"]], "value": t["content"]} for t in m]} for m in MESSAGES]
    expected = [m for _, m in load_conversations(write_jsonl(tmp_path / "c.jsonl", rows))]
    assert expected == MESSAGES
    assert [m for _, m in load_conversations(TABLES[kind](tmp_path / "c", rows))] == expected


@pytest.mark.parametrize("kind", TABLES)
def test_sft_reads_alpaca_tables_like_jsonl(tmp_path, kind):
    expected = [m for _, m in load_conversations(write_jsonl(tmp_path / "a.jsonl", ALPACA))]
    assert expected[1][0]["content"] == "Translate\n\n고양이"
    assert [m for _, m in load_conversations(TABLES[kind](tmp_path / "a", ALPACA))] == expected


@pytest.mark.parametrize("kind, where", [("csv", r"a\.csv:3"), ("parquet", r"a\.parquet row 1"),
                                         ("save_to_disk", r"a row 1")])
def test_a_malformed_row_stops_or_is_skipped_as_in_jsonl(tmp_path, kind, where):
    if kind == "csv":  # CSV has no null: the flaw is a row with too few cells
        path = tmp_path / "a.csv"
        path.write_text("instruction,input,output\nQ1,,A1\nonly,two\nQ3,x,A3\n", encoding="utf-8")
    else:  # a record with no answer (output null)
        rows = [ALPACA[0], {"instruction": "No answer here", "input": "", "output": None}, ALPACA[1]]
        path = TABLES[kind](tmp_path / "a", rows)
    with pytest.raises(MiniloraError, match=where):
        load_conversations(path)
    stats = SFTStats()
    kept = load_conversations(path, on_error="skip", stats=stats)
    assert (len(kept), stats.skipped, stats.records) == (2, 1, 3)
    assert where.replace("\\", "") in stats.examples[0]


def test_plain_text_in_sft_mode_points_to_base_mode(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("Some raw text.\n\nMore raw text.\n", encoding="utf-8")
    with pytest.raises(MiniloraError, match=r"corpus\.txt is plain text.*--mode base"):
        load_conversations(path)


def test_missing_pyarrow_is_a_clear_error_naming_the_install(tmp_path, monkeypatch):
    path = TABLES["parquet"](tmp_path / "d", [{"text": "hello"}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    with pytest.raises(MiniloraError, match=r"needs pyarrow.*pip install 'minilora\[pyarrow\]'"):
        load_texts(path)
    assert load_texts(write_csv(tmp_path / "d.csv", [{"text": "hello"}])) == ["hello"]  # CSV needs no pyarrow


def test_a_dataset_dict_folder_names_its_splits(tmp_path):
    root = tmp_path / "dd"
    root.mkdir()
    write_saved_dataset(root / "train", [{"text": "a"}, {"text": "b"}])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(MiniloraError, match=r"splits train, test.*--data .*dd/train"):
        load_texts(root)
    assert load_texts(root / "train") == ["a", "b"]


def test_sft_run_trains_from_a_parquet_file(tmp_path):
    """End to end through the trainer's data step: the parquet file gives exactly the JSONL file's samples."""
    from minilora.train_config import TrainConfig
    from minilora.train_data import build_datasets
    from minilora.tokenizer import load_tokenizer
    from minilora.config import load_config
    from tiny_models import make_tiny_checkpoint
    from tiny_tokenizers import set_chat_template

    model = make_tiny_checkpoint("llama", tmp_path / "model", tokenizer="llama3")
    set_chat_template(model, "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rows = [{"messages": m} for m in MESSAGES * 3]
    jsonl = write_jsonl(tmp_path / "c.jsonl", rows)
    parquet = TABLES["parquet"](tmp_path / "c", rows)
    tok, mc = load_tokenizer(model), load_config(model)
    got = [build_datasets(TrainConfig(model=str(model), data=str(p), mode="sft", block_size=64, val_fraction=0.2),
                          tok, mc) for p in (jsonl, parquet)]
    assert got[0][0].samples == got[1][0].samples and got[0][1].samples == got[1][1].samples
    assert len(got[1][0].samples) == 5
