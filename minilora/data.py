"""Base fine-tuning data: raw text files → documents → token blocks → padded batches.

Continued pre-training ("base FT") feeds the model plain text, exactly as it was pre-trained:

    documents   "Tea is picked in May..."   "차는 오월에 따서..."   ...
    tokens      [BOS] t t t t [EOS] [BOS] t t t [EOS] [BOS] t t ...      (BOS only if the tokenizer adds one)
    blocks      |<---- block_size ---->|<---- block_size ---->|<- rest ->|

Every block trains on every token: labels = input_ids, and the loss (loss.py) shifts them by one, so position t
predicts token t+1. A document may start in one block and end in the next; EOS between documents teaches the model
where a text ends. Attention crosses document boundaries inside a block, as in GPT-style pre-training (sft.py's
packing keeps samples apart instead, because there each sample is a separate conversation).

Input files (`load_texts`):
- `.txt`: documents are separated by one or more blank lines (a paragraph, an article...). A file without blank
  lines is one document. Lines inside a document keep their newlines.
- `.jsonl`: one JSON object per line with the text in `text_field` (default "text"); blank lines are skipped.
- `.json`: a list of such objects, or an object {"data": [...]}.
- `.csv`, `.tsv`, `.parquet`, `.arrow`, a `datasets.save_to_disk` folder: a table with the text in column
  `text_field` (read by table_files.py; Parquet and Arrow need the optional pyarrow).
A malformed line, a missing field or a non-string value stops with an error naming the file, the line, the field
and the fields that do exist; so do JSON that Python decodes but no tokenizer takes (a lone UTF-16 surrogate
"\\ud83d") and nesting too deep to decode (sft.py can skip such records instead). Empty documents are skipped;
a file with none left is an error.

Also here, shared with sft.py: the padding collator (dynamic right padding to the longest sample of the batch,
attention_mask, labels -100 on padding), the seeded train/validation split and the seeded per-epoch order that
makes the data position a pure function of the step (so a resumed run sees the same batches).

Deliberately not handled: streaming corpora larger than memory, document-level attention masking in base FT.
"""

import json
import random
import re
import sys
from pathlib import Path

import torch

from .errors import MiniloraError
from .loss import IGNORE_INDEX  # label of a position the loss skips (padding, prompts)
from .table_files import TABLE_SUFFIXES, is_saved_dataset, is_table, read_table

RECORD_SUFFIXES = (".jsonl", ".json") + TABLE_SUFFIXES  # files of records (or a save_to_disk folder)
SUPPORTED = (".txt",) + RECORD_SUFFIXES
MAX_TOKENIZE_CHARS = 1_000_000  # characters encoded at once (see tokenize_documents)
_LINE_START = re.compile(r"\S\n")  # searched in reversed text: a newline followed by a non-space character
_SURROGATE = re.compile("[\ud800-\udfff]")  # a valid pair decodes to one code point; only lone halves remain


# ----------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------
def _check_file(path, allowed=SUPPORTED) -> Path:
    path = Path(path)
    if is_saved_dataset(path):
        return path
    if not path.is_file():
        raise MiniloraError(f"data file {path} not found")
    if path.suffix.lower() not in allowed:
        raise MiniloraError(f"data file {path}: unsupported extension {path.suffix or '(none)'!r}; "
                            f"use one of {', '.join(allowed)}")
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is not text
    except UnicodeDecodeError as e:
        raise MiniloraError(f"{path} is not UTF-8 text ({e})") from None


def _json_list_lines(text: str, start: int) -> list[int]:
    """Line number of each item of the JSON list that starts at text[start] == '['."""
    decoder, lines, pos = json.JSONDecoder(), [], start + 1
    skip = re.compile(r"[\s,]*")
    while True:
        pos = skip.match(text, pos).end()
        if text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)


def _json_data_start(text: str) -> int:
    """Index of the '[' of the "data" list in an object {"data": [...], ...} (the file is valid JSON)."""
    decoder, pos = json.JSONDecoder(), text.index("{") + 1
    skip = re.compile(r"[\s,:]*")
    while True:
        pos = skip.match(text, pos).end()
        key, pos = decoder.raw_decode(text, pos)  # a key
        pos = skip.match(text, pos).end()
        if key == "data":
            return pos
        _, pos = decoder.raw_decode(text, pos)  # its value


def read_records(path, allowed=RECORD_SUFFIXES, skipped: list | None = None) -> list[tuple[str, dict]]:
    """The JSON objects of a .jsonl or .json file (or the rows of a table, table_files.py), each with its
    location "file:line" for error messages.

    A .jsonl line that is not a JSON object raises MiniloraError — or, when a `skipped` list is given, is
    appended to it as "file:line: problem" and left out (the trainer's on_error="skip").
    """
    path = _check_file(path, allowed)
    if is_table(path):
        return read_table(path, skipped)
    text = _read_text(path)
    records = []
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except (json.JSONDecodeError, RecursionError) as e:
                problem = (f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                           "a .jsonl file needs one JSON object per line" if isinstance(e, json.JSONDecodeError)
                           else f"{path}:{lineno}: JSON nested too deeply to read (over ~{sys.getrecursionlimit()} "
                           "levels); no chat record needs that")
                if skipped is None:
                    raise MiniloraError(problem) from None
                skipped.append(problem)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MiniloraError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise MiniloraError(f"{path}: JSON nested too deeply to read (over ~{sys.getrecursionlimit()} "
                                "levels)") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            items, start = data["data"], _json_data_start(text)
        elif isinstance(data, list):
            items, start = data, text.index("[")
        else:
            raise MiniloraError(f"{path}: expected a JSON list of records or an object {{\"data\": [...]}}")
        records = [(f"{path}:{line}", item) for line, item in zip(_json_list_lines(text, start), items)]
    kept = []
    for where, record in records:
        problem = (f"{where}: expected a JSON object (a record with fields), found {type(record).__name__}"
                   if not isinstance(record, dict) else _unencodable(record, where))
        if problem is None:
            kept.append((where, record))
        elif skipped is None:
            raise MiniloraError(problem)
        else:
            skipped.append(problem)
    return kept


def _unencodable(record: dict, where: str) -> str | None:
    """Why a decoded record cannot become text for the tokenizer, or None.

    JSON may escape half of a UTF-16 surrogate pair ("\\ud83d" alone): Python decodes it to a str that has no
    UTF-8 form, which the tokenizer (Rust) then refuses with an exception far from the file. Every string (keys
    too) is searched in place, with a stack rather than recursion, so a 50 MB record costs no copy."""
    stack = [record]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and (found := _SURROGATE.search(value)):
            return (f"{where}: holds a lone UTF-16 surrogate {found.group().encode('unicode_escape').decode()} "
                    "(half of an escaped emoji pair?), which is not text; fix or remove the record")
    return None


def load_texts(path, text_field: str = "text") -> list[str]:
    """The documents of a .txt (blank-line separated) file, or the field `text_field` of each record of a
    .jsonl/.json file or table (.csv, .tsv, .parquet, .arrow, save_to_disk folder)."""
    path = _check_file(path)
    if path.suffix.lower() == ".txt":
        docs = [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", _read_text(path).replace("\r\n", "\n"))]
    else:
        docs = []
        for where, record in read_records(path):
            if text_field not in record:
                fields = ", ".join(record) or "none"
                raise MiniloraError(f"{where}: no field {text_field!r} (this record has: {fields}); "
                                    "choose the field with --text-field")
            value = record[text_field]
            if not isinstance(value, str):
                raise MiniloraError(f"{where}: field {text_field!r} should be a string, found {type(value).__name__}")
            docs.append(value)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MiniloraError(f"data file {path} contains no text (every document is empty)")
    return docs


# ----------------------------------------------------------------------------------------------------------
# Tokens → blocks
# ----------------------------------------------------------------------------------------------------------
def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per document, with the special tokens the tokenizer adds (BOS for Llama/Gemma, none for Qwen).

    In bounded memory: a tokenizer's output costs ~170 bytes per character of text until only the ids are kept
    (measured: a 5.2 MB document grew peak RSS by 877 MiB), so documents are encoded in batches of at most
    MAX_TOKENIZE_CHARS characters, and a longer document in pieces of that size cut after a line end
    (`_encode_long`)."""
    ids: list = [None] * len(texts)
    batch: list[int] = []  # indices of the documents waiting to be encoded together
    size = 0

    def flush():
        for i, row in zip(batch, tokenizer.encode_batch([texts[i] for i in batch], add_special_tokens=True)):
            ids[i] = row
        batch.clear()

    for i, text in enumerate(texts):
        if len(text) > MAX_TOKENIZE_CHARS:
            ids[i] = _encode_long(tokenizer, text)
            continue
        if size + len(text) > MAX_TOKENIZE_CHARS:
            flush()
            size = 0
        batch.append(i)
        size += len(text)
    flush()
    return ids


def _encode_long(tokenizer, text: str) -> list[int]:
    """The ids of a document longer than MAX_TOKENIZE_CHARS, encoded piece by piece.

    Pieces end after a newline that a non-space character follows, where byte-level pre-tokenizers (GPT-2,
    Llama 3, Qwen) split anyway, so for them the ids equal encoding the whole text. SentencePiece-style tokenizers
    (a "▁" put before each text) may differ by a token at each cut: one per million characters. The special
    tokens the tokenizer adds around a text (BOS...) are added once, around the whole document."""
    probe, plain = tokenizer.encode("a", add_special_tokens=True), tokenizer.encode("a", add_special_tokens=False)
    k = next((k for k in range(len(probe)) if probe[k:k + len(plain)] == plain), 0)
    prefix, suffix = probe[:k], probe[k + len(plain):]
    ids, start = list(prefix), 0
    while start < len(text):
        end = start + MAX_TOKENIZE_CHARS
        if end < len(text):
            cut = _LINE_START.search(text[start + MAX_TOKENIZE_CHARS // 2:end][::-1])  # the last good cut
            end = end - 1 - cut.start() if cut else end
        ids += tokenizer.encode(text[start:end], add_special_tokens=False)
        start = end
    return ids + suffix


def pack_into_blocks(docs_token_ids: list[list[int]], block_size: int, eos_id: int | None) -> list[dict]:
    """Concatenate the documents with EOS after each and cut the stream into blocks of `block_size` tokens.

    The last, shorter block is kept (the padding collator pads it, labels -100 on the padding) unless it has
    fewer than 2 tokens, which give no next-token target. EOS is not doubled when a document already ends with it.
    """
    if block_size < 2:
        raise MiniloraError(f"block size must be at least 2 tokens, got {block_size}")
    stream: list[int] = []
    for ids in docs_token_ids:
        stream.extend(ids)
        if eos_id is not None and (not ids or ids[-1] != eos_id):
            stream.append(eos_id)
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    if blocks and len(blocks[-1]) < 2:
        blocks.pop()
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------
def pad_collate(samples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples to the longest one → (B, T) tensors.

    Each sample has `input_ids` and optionally `labels` (default: the input ids), `segment_ids` and
    `position_ids` (packed SFT rows). Padding gets `pad_id`, label -100, attention_mask 0, segment id 0 and
    position 0. With segment ids, attention_mask is 1 exactly where the segment id is > 0.
    """
    if not samples:
        raise ValueError("pad_collate needs at least one sample")
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    extra = {k: torch.zeros((B, T), dtype=torch.long) for k in ("segment_ids", "position_ids") if k in samples[0]}
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n] = torch.as_tensor(s["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(s.get("labels", s["input_ids"]), dtype=torch.long)
        attention_mask[i, :n] = 1
        for key, tensor in extra.items():
            tensor[i, :n] = torch.as_tensor(s[key], dtype=torch.long)
    if "segment_ids" in extra:
        attention_mask = (extra["segment_ids"] > 0).long()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, **extra}


def check_token_ids(samples: list[dict], vocab_size: int, what: str) -> None:
    """MiniloraError when a sample holds a token id with no embedding row (an IndexError at its first batch
    otherwise). The loader checks the tokenizer against the model already; this guards samples built elsewhere."""
    for k, sample in enumerate(samples):
        ids = sample["input_ids"]
        if ids and (max(ids) >= vocab_size or min(ids) < 0):
            bad = max(ids) if max(ids) >= vocab_size else min(ids)
            raise MiniloraError(f"{what}: sample {k} holds token id {bad}, outside the model's embedding "
                                f"(ids 0..{vocab_size - 1}, vocab_size in config.json); the tokenizer does not "
                                "match the model")


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else EOS, else 0 (its value never matters: padding has
    attention_mask 0 and label -100)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def split_train_val(items: list, val_fraction: float, seed: int = 0, what: str = "the data") -> tuple[list, list]:
    """Hold out round(len * val_fraction) items (at least 1) for validation, chosen by a seeded draw.

    Both parts keep the original order. val_fraction 0 returns (all items, []).
    """
    if not 0 <= val_fraction < 1:
        raise MiniloraError(f"validation fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(items), []
    n = len(items)
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise MiniloraError(f"{what} has only {n} item(s): too few to hold out {val_fraction:.0%} for validation; "
                            "add data, give a separate validation file, or set the validation fraction to 0")
    held_out = set(random.Random(seed).sample(range(n), n_val))
    train = [x for i, x in enumerate(items) if i not in held_out]
    val = [x for i, x in enumerate(items) if i in held_out]
    return train, val


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded order in which epoch `epoch` visits n samples: a pure function, so resuming needs no state."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


# ----------------------------------------------------------------------------------------------------------
# Everything at once (what the trainer calls)
# ----------------------------------------------------------------------------------------------------------
def load_base_data(path, tokenizer, block_size: int, text_field: str = "text", val_path=None,
                   val_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train blocks, validation blocks) for base FT.

    Documents (not blocks) are split, so no document is partly in both sets. With `val_path`, that file is the
    validation set and `val_fraction` is ignored.
    """
    docs = load_texts(path, text_field)
    if val_path is not None:
        train_docs, val_docs = docs, load_texts(val_path, text_field)
    else:
        train_docs, val_docs = split_train_val(docs, val_fraction, seed, what=f"data file {path}")
    eos_id = tokenizer.eos_token_id
    train = pack_into_blocks(tokenize_documents(tokenizer, train_docs), block_size, eos_id)
    val = pack_into_blocks(tokenize_documents(tokenizer, val_docs), block_size, eos_id) if val_docs else []
    if not train:
        raise MiniloraError(f"data file {path} gives no training block (under 2 tokens of text)")
    return train, val
