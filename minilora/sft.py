"""Instruction fine-tuning (SFT) data: records → conversations → chat-template tokens with response-only labels.

Three record formats (JSONL, JSON or a table: CSV, Parquet, Arrow; field names configurable through `SFTFields`),
detected from the first record:

    alpaca     {"instruction": "...", "input": "...", "output": "...", "system": "..."}   (input, system optional)
    messages   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}      (OpenAI style)
    sharegpt   {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}

An alpaca record becomes [system?, user, assistant] with the user turn = instruction, or instruction + "\\n\\n" + input
when the input is not empty (the layout of the original Alpaca prompt, without its preamble: the model's own chat
template supplies the framing).

Response-only labels. The conversation is rendered with the model's chat template and tokenised as one text; a
token keeps its id as label only if it belongs to an assistant reply, everything else gets -100. The replies are
found from the template itself, for any template, with no per-family strings:

    before_i = render(messages[:i], add_generation_prompt=True)   # the prompt the model sees before reply i
    after_i  = render(messages[:i+1])                              # the text once reply i is written
    reply_i  = after_i[len(before_i):]                             # e.g. "Paris.<end_of_turn>\\n"

then reply_i is located in the full rendering (normally at len(before_i); by search when the template renders
earlier turns differently once later ones exist), cut where the full text stops agreeing with it (later turns
follow; never inside a token of what follows: "<|end|>\\n<|endoftext|>" and "<|end|>\\n<|user|>" share "<|"),
and trailing whitespace is dropped. What remains is the reply as the template wrote it (trimmed if the template
trims) plus the end-of-turn marker that closes it ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "</s>", "<|end|>"),
so the model learns to stop. Tokens overlapping those character spans (tokenizers' offsets) are trained. What a
template appends only after the final turn stays with it (Phi-3 writes "\\n<|endoftext|>" after the last reply,
so the last reply trains on it too). If before_i is not a prefix of after_i (Mistral v0.3 shows the system prompt
in the last user turn only, so it moves once the reply exists), the reply starts at the content's last occurrence.

Packing without leakage. `pack_samples` puts samples (best fit) into rows of at most max_len tokens with
`segment_ids` 1, 2, 3... per sample (0 = padding, added by the collator) and `position_ids` restarting at 0 for
each sample; the model attends only within a segment. The first label of each sample is -100, so no sample is
trained to predict the next one's first token: the loss of a packed row equals the sum of the samples' own losses.

A template that rewrites an earlier reply once later turns exist (Qwen3 drops the reasoning of turns before the
last user query) renders that turn shorter in the whole conversation: there it is trained as the whole
conversation shows it, from the prompt to the end of the longest ending it shares with its own last form
(content, tool calls, end-of-turn marker). A reply is also compared with its rendering followed by a generation
prompt (gpt-oss closes a final reply with <|return|>, an earlier one with <|end|>), and a span never ends in the
start of the next turn's header (what begins like the generation prompt: "<|im_start|>", "<|start|>").
Tool calls are part of the assistant turn and trained with it; a span must contain the reply's text and the names
of its tool calls (those the template writes), or the conversation is reported naming the template and the turn.
Cost: four renders per assistant turn (prompt, history, reply, reply + generation prompt).

Deliberately not handled: per-turn weights, and templates whose rendering of a reply cannot be found from the
renders above: such a conversation is reported as malformed (naming the template and the turn) rather than
trained on a guess.
"""

import bisect
import os
from dataclasses import dataclass, field

from .data import IGNORE_INDEX, read_records, split_train_val
from .errors import MiniloraError

FORMATS = ("alpaca", "messages", "sharegpt")
# Records longer than this (characters of all their turns) are refused before rendering and tokenising: those hold
# the whole text several times over (template renderings, ids, offsets, a per-character mask), ~180 bytes per
# character, so one 50 MB reply took 9 GB. The limit grows with max_len (16 characters per token is more than any
# tokenizer averages), so a record it refuses would lose most of its text to truncation anyway.
MAX_RECORD_CHARS = 1_000_000
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names → chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}


@dataclass
class SFTFields:
    """The JSON field names of each record format (change them for datasets that name fields differently)."""

    instruction: str = "instruction"  # alpaca: the task
    input: str = "input"  # alpaca: optional extra input appended to the task
    output: str = "output"  # alpaca: the answer to learn
    system: str = "system"  # any format: optional system prompt at record level
    messages: str = "messages"  # messages: list of {role, content}
    role: str = "role"
    content: str = "content"
    conversations: str = "conversations"  # sharegpt: list of {from, value}
    speaker: str = "from"
    value: str = "value"


@dataclass
class SFTStats:
    """What happened to the records on their way to training samples (the trainer prints `summary()`)."""

    records: int = 0  # records read
    skipped: int = 0  # malformed records skipped (on_error="skip")
    truncated: int = 0  # samples cut to max_len
    dropped_overlong: int = 0  # samples over max_len dropped (overlong="drop")
    dropped_no_target: int = 0  # samples with no trained token left (e.g. the reply was truncated away)
    samples: int = 0  # samples kept
    empty_replies: int = 0  # assistant replies that are empty or whitespace only (kept, but they teach silence)
    first_empty_reply: str | None = None  # "file:line" of the first such reply
    examples: list[str] = field(default_factory=list)  # the first few problems, for the log
    warnings: list[str] = field(default_factory=list)  # what trains, but probably not as meant (printed)

    def note(self, message: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(message)

    def summary(self) -> str:
        parts = [f"{self.samples} samples from {self.records} records"]
        for name in ("skipped", "truncated", "dropped_overlong", "dropped_no_target"):
            if getattr(self, name):
                parts.append(f"{getattr(self, name)} {name.replace('_', ' ')}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Records → conversations
# ----------------------------------------------------------------------------------------------------------
def detect_format(record: dict, fields: SFTFields = SFTFields()) -> str:
    """"messages", "sharegpt" or "alpaca", from which fields the record has."""
    if fields.messages in record:
        return "messages"
    if fields.conversations in record:
        return "sharegpt"
    if fields.instruction in record and fields.output in record:
        return "alpaca"
    raise MiniloraError(f"cannot tell the record format from its fields ({', '.join(record) or 'none'}): expected "
                        f"{fields.messages!r} (messages), {fields.conversations!r} (sharegpt) or "
                        f"{fields.instruction!r} + {fields.output!r} (alpaca); set the format or the field names")


def _string(record: dict, name: str, optional: bool = False) -> str | None:
    if name not in record or (optional and record[name] is None):
        if optional:
            return None
        raise ValueError(f"missing field {name!r} (the record has: {', '.join(record) or 'none'})")
    if not isinstance(record[name], str):
        raise ValueError(f"field {name!r} should be a string, found {type(record[name]).__name__}")
    return record[name]


def _turns(record: dict, list_field: str, role_field: str, text_field: str, roles: dict) -> list[dict]:
    turns = record.get(list_field)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field {list_field!r} should be a non-empty list of turns")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{list_field}[{k}] should be an object, found {type(turn).__name__}")
        speaker = _string(turn, role_field)
        if speaker not in roles:
            raise ValueError(f"{list_field}[{k}] has unknown {role_field} {speaker!r} "
                             f"(expected one of: {', '.join(roles)})")
        messages.append({"role": roles[speaker], "content": _string(turn, text_field)})
    return messages


def record_to_messages(record: dict, fmt: str, fields: SFTFields = SFTFields()) -> list[dict]:
    """One record as a list of {"role", "content"} messages; ValueError says what is wrong with it."""
    if fmt == "alpaca":
        instruction, extra = _string(record, fields.instruction), _string(record, fields.input, optional=True)
        user = instruction + "\n\n" + extra if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _string(record, fields.output)}]
    elif fmt == "messages":
        messages = _turns(record, fields.messages, fields.role, fields.content, {r: r for r in ROLES})
    elif fmt == "sharegpt":
        messages = _turns(record, fields.conversations, fields.speaker, fields.value, SHAREGPT_ROLES)
    else:
        raise MiniloraError(f"unknown SFT format {fmt!r}; expected one of {', '.join(FORMATS)} or 'auto'")
    system = _string(record, fields.system, optional=True)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to learn from this record")
    return messages


def load_conversations(path, fmt: str = "auto", on_error: str = "stop",
                       fields: SFTFields = SFTFields(), stats: SFTStats | None = None) -> list[tuple[str, list]]:
    """[(location "file:line", messages)] from a .jsonl/.json file or a table (see table_files.py).

    A malformed record raises MiniloraError naming its line (on_error="stop") or is skipped and counted in
    `stats.skipped` (on_error="skip").
    """
    if on_error not in ("stop", "skip"):
        raise MiniloraError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else SFTStats()
    if str(path).lower().endswith(".txt"):
        raise MiniloraError(f"data file {path} is plain text, which has no prompts and replies: SFT needs records "
                            "(alpaca, messages or ShareGPT) in .jsonl/.json/.csv/.tsv/.parquet/.arrow; to train on "
                            "raw text, use --mode base")
    unreadable = [] if on_error == "skip" else None
    records = read_records(path, skipped=unreadable)
    for problem in unreadable or []:
        stats.records += 1
        stats.skipped += 1
        stats.note(problem)
    if not records:
        raise MiniloraError(f"data file {path} has no records")
    if fmt == "auto":
        where, first = records[0]
        try:
            fmt = detect_format(first, fields)
        except MiniloraError as e:
            raise MiniloraError(f"{where}: {e}") from None
    conversations = []
    for where, record in records:
        stats.records += 1
        try:
            conversations.append((where, record_to_messages(record, fmt, fields)))
        except ValueError as e:
            if on_error == "stop":
                raise MiniloraError(f"{where}: malformed {fmt} record: {e} "
                                    "(use on_error='skip' to skip such records)") from None
            stats.skipped += 1
            stats.note(f"{where}: {e}")
    if not conversations:
        raise MiniloraError(f"data file {path}: every record was malformed ({stats.skipped} skipped)")
    return conversations


# ----------------------------------------------------------------------------------------------------------
# Conversations → tokens and response-only labels
# ----------------------------------------------------------------------------------------------------------
def _common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _common_suffix_len(a: str, b: str) -> int:
    return _common_prefix_len(a[::-1], b[::-1])


def _search_reply(full: str, reply: str, cursor: int) -> int:
    """Start of the longest prefix of `reply` that occurs in full[cursor:] (binary search on its length)."""
    lo, hi, pos = 0, len(reply), -1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        found = full.find(reply[:mid], cursor)
        if found >= 0:
            lo, pos = mid, found
        else:
            hi = mid - 1
    return pos


def _reply_text(message: dict) -> str:
    """The reply's text: the content string, or the text parts of a content list; "" for a tool-call-only turn."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content.strip() if isinstance(content, str) else ""


def _tool_call_names(message: dict) -> list[str]:
    calls = message.get("tool_calls") or []
    names = [c.get("function", c).get("name") for c in calls if isinstance(c, dict)]
    return [n for n in names if isinstance(n, str) and n]


def _holds(span: str, core: str, names: list[str], reply: str) -> bool:
    """Does a candidate span hold the reply's text and tool call names, those its last form `reply` writes?"""
    return bool(span.strip()) and all(part in span for part in [core, *names] if part in reply)


def _suffix_end(full: str, reply: str, pos: int, parts: list[str]) -> int:
    """End of the first occurrence, from pos, of the longest suffix of `reply` (binary search on its length):
    an earlier turn rendered shorter (without its reasoning) still ends with the same text and end-of-turn.
    The suffix must hold the last of `parts` (content, tool call names) that the reply writes; else pos."""
    starts = [reply.rfind(part) for part in parts if part and part in reply]
    lo, hi, end = 0, len(reply), pos
    while lo < hi:
        mid = (lo + hi + 1) // 2
        found = full.find(reply[len(reply) - mid:], pos)
        if found >= 0:
            lo, end = mid, found + mid
        else:
            hi = mid - 1
    return end if not starts or lo >= len(reply) - max(starts) else pos


def _header_overlap(span: str, header: str) -> int:
    """Length of the longest end of `span` (2+ characters) that begins `header`, the generation prompt: there the
    next turn's header starts, not the reply ("<|im_start|>" of "<|im_start|>user" vs "<|im_start|>assistant")."""
    return next((k for k in range(min(len(span), len(header)), 1, -1) if header.startswith(span[-k:])), 0)


def assistant_spans(render, messages: list[dict], boundaries: list[int] | None = None,
                    full: str | None = None) -> tuple[str, list]:
    """The rendered conversation and the (start, end) character span of each assistant reply in it.

    `render(messages, add_generation_prompt) -> str` is the chat template; `boundaries` (sorted character
    positions, e.g. the token ends of the rendered text) are where a reply may end: a reply never ends inside a
    token of the text that follows it. `full` is render(messages, False) when the caller already has it.
    See the module docstring.
    """
    full = render(messages, False) if full is None else full
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        core, names = _reply_text(message), _tool_call_names(message)
        try:
            before = render(messages[:i], True)
        except MiniloraError:
            if i:
                raise
            before = ""  # a template that cannot render an empty conversation: the reply starts the text
        after = render(messages[:i + 1], False)
        history = render(messages[:i], False) if i else ""  # before = history + the generation prompt
        header = before[_common_prefix_len(before, history):].strip()  # Phi-3 ends a history without it in eos
        if after.startswith(before):
            start = len(before)
        elif (c := _common_prefix_len(before, after)) >= len(history):
            start = c  # the generation prompt opens something this turn does not use (Gemma 4, Qwen3.5 <think>)
        else:  # the prompt renders differently once the reply exists (Mistral v0.3 drops the system prompt)
            start = after.rfind(core) if core else -1
            if start < 0:
                raise ValueError(f"cannot find assistant turn {i} in the chat template's rendering")
        reply = after[start:]
        c = _common_prefix_len(full, after[:start])
        if start >= cursor and c == start:
            pos = start
        elif c >= cursor and c >= len(history):
            pos = c  # only the generation prompt differs in the whole conversation: Qwen3.5 writes no <think> there
        else:  # earlier turns render differently in the whole conversation: find the reply after the last one
            pos = _search_reply(full, reply, cursor)
            if pos < 0 or core not in full[pos:pos + len(reply)]:  # rewritten too (Qwen3.5: a turn after tool
                end = _suffix_end(full, reply.rstrip(), cursor, [core, *names])  # replies, earlier <think> gone):
                matched = _common_suffix_len(reply.rstrip(), full[cursor:end])  # the ending it shares with its
                pos = end - matched if end > cursor else -1  # last form, found after the previous turn
                while 0 <= pos < end and full[pos].isspace():  # a newline it shares is the header's
                    pos += 1
            if pos < 0 or core not in full[pos:pos + len(reply)]:
                raise ValueError(f"cannot locate assistant turn {i} in the rendered conversation "
                                 "(the chat template renders it differently when later turns follow)")
        end = pos + _common_prefix_len(reply, full[pos:pos + len(reply)])
        try:  # the turn as written when another turn follows: gpt-oss ends a last reply with <|return|>, others <|end|>
            followed = render(messages[:i + 1], True)
        except MiniloraError:
            followed = ""
        if followed.startswith(after[:start]):
            end = max(end, pos + _common_prefix_len(followed[start:], full[pos:]))
        written = any(part and part in reply for part in [core, *names])  # templates drop some of them
        rewritten = written and not _holds(full[pos:end], core, names, reply)
        if rewritten:  # rewritten once later turns exist (Qwen3 drops the reasoning): it ends as its last form does
            end = _suffix_end(full, reply.rstrip(), pos, [core, *names])
            if not _holds(full[pos:end], core, names, reply):
                raise ValueError(f"cannot locate assistant turn {i} in the rendered conversation "
                                 "(the chat template renders it differently when later turns follow)")
        if end < len(full):  # the next turn's header may start like the generation prompt ("<|im_start|>"): not
            overlap = _header_overlap(full[pos:end].rstrip(), header)  # the reply (gpt-oss: "<|end|><|start|>")
            end = pos + len(full[pos:end].rstrip()) - overlap if overlap else end
            if not overlap and not rewritten and not full.startswith(reply.rstrip(), pos):  # diverged inside the
                parts_end = max([full.rfind(p, pos, end) + len(p) for p in [core, *names] if p and p in reply]
                                or [pos])  # reply: a template without a distinct prompt (Hammer 2.1) ends a turn
                # at a line end
                if (newline := full.rfind("\n", parts_end, end)) >= 0:
                    end = newline + 1
        if boundaries:  # e.g. "<|end|>\n<|endoftext|>" vs "<|end|>\n<|user|>" agree on "<|": not a reply
            k = bisect.bisect_right(boundaries, end)
            end = max(pos, boundaries[k - 1]) if k else pos
        end = pos + len(full[pos:end].rstrip())
        if end > pos:
            spans.append((pos, end))
            cursor = end
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], train_on_prompt: bool = False) -> dict:
    """{"input_ids", "labels"} of one conversation: labels are -100 outside the assistant replies.

    The ids equal `tokenizer.apply_chat_template(messages)` (the same text, encoded without added specials).
    """
    render = lambda msgs, gen: tokenizer.render_chat(msgs, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    ids, offsets = tokenizer.encode_with_offsets(full, add_special_tokens=False)
    if train_on_prompt:
        return {"input_ids": ids, "labels": list(ids)}
    try:
        _, spans = assistant_spans(render, messages, boundaries=sorted({e for _, e in offsets}), full=full)
    except ValueError as e:  # name the template: the turn alone does not say which model's format fails
        raise ValueError(f"chat template of {tokenizer.name_or_path}: {e}") from None
    # marked[c] = number of reply characters before character c, so a token (s, e) overlaps a reply iff
    # marked[e] > marked[s]; a zero-width token counts if the character at s is in a reply.
    in_reply = bytearray(len(full) + 1)
    for s, e in spans:
        in_reply[s:e] = b"\x01" * (e - s)
    marked = [0]
    for flag in in_reply:
        marked.append(marked[-1] + flag)
    labels = [tok if (marked[e] > marked[s] or (s == e and in_reply[s])) else IGNORE_INDEX
              for tok, (s, e) in zip(ids, offsets)]
    return {"input_ids": ids, "labels": labels}


def build_sft_samples(tokenizer, conversations: list[tuple[str, list]], max_len: int, overlong: str = "truncate",
                      train_on_prompt: bool = False, on_error: str = "stop",
                      stats: SFTStats | None = None) -> list[dict]:
    """Tokenised samples of at most max_len tokens; over-long ones truncated (the end is cut) or dropped.

    A conversation the chat template rejects (e.g. roles that do not alternate) is a malformed record: an error
    naming its line, or skipped with on_error="skip". Samples left with no trained token are dropped.
    """
    if overlong not in ("truncate", "drop"):
        raise MiniloraError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    stats = stats if stats is not None else SFTStats()
    samples, limit = [], record_char_limit(max_len)
    for where, messages in conversations:
        chars = sum(len(m["content"]) for m in messages)
        if chars > limit:
            problem = (f"{where}: the record has {chars:,} characters, over the limit of {limit:,} "
                       f"(sft.MAX_RECORD_CHARS, or 16 per token of max_len), which keeps memory bounded; split it")
            if on_error == "stop":
                raise MiniloraError(problem + " or skip such records with on_error='skip'")
            stats.skipped += 1
            stats.note(problem)
            continue
        empty = sum(1 for m in messages if m["role"] == "assistant" and not m["content"].strip())
        if empty and stats.first_empty_reply is None:
            stats.first_empty_reply = where
        stats.empty_replies += empty
        try:
            sample = tokenize_conversation(tokenizer, messages, train_on_prompt)
        except (MiniloraError, ValueError) as e:
            if on_error == "stop":
                raise MiniloraError(f"{where}: cannot render this conversation with the chat template: {e}") from None
            stats.skipped += 1
            stats.note(f"{where}: {e}")
            continue
        if len(sample["input_ids"]) > max_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
            sample = {k: v[:max_len] for k, v in sample.items()}
        if all(label == IGNORE_INDEX for label in sample["labels"][1:]):  # label 0 is never predicted
            stats.dropped_no_target += 1
            stats.note(f"{where}: no assistant token within {max_len} tokens")
            continue
        samples.append(sample)
    stats.samples += len(samples)
    return samples


def record_char_limit(max_len: int) -> int:
    """The most characters a record may have (see MAX_RECORD_CHARS)."""
    return max(MAX_RECORD_CHARS, 16 * max_len)


def end_of_turn_warning(tokenizer) -> str | None:
    """A warning when the chat template writes no end-of-turn or EOS token after an assistant reply (Alpaca-style
    "### Response:" templates): the trained labels then never show the model where to stop, so it rambles on."""
    from .chat import closing_token_id

    try:
        closing = closing_token_id(tokenizer)
    except (MiniloraError, ValueError):
        return None  # a template that cannot render this probe: the records themselves will say why
    if closing is not None:
        return None
    return (f"the chat template of {tokenizer.name_or_path} writes no end-of-turn or EOS token after an assistant "
            "reply, so nothing teaches the model to stop: end the assistant turn with {{ eos_token }} in the "
            "template")


# ----------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------
def pack_samples(samples: list[dict], max_len: int) -> list[dict]:
    """Pack samples into rows of at most max_len tokens, without leakage between them.

    Best fit in input order: each sample goes into the open row with the least room that still holds it (a new
    row if none does), which fills rows far better than starting a new row whenever the next sample does not fit.
    Each row has input_ids, labels, segment_ids (1, 2, ... per sample) and position_ids (0.. per sample). The
    first label of every sample is -100: under the shifted loss it would be predicted from the previous sample.
    Rows are not padded here; pad_collate pads them (segment id 0, label -100).
    """
    rows: list[dict] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index) of rows with free space, sorted
    for sample in samples:
        n = len(sample["input_ids"])
        if n > max_len:
            raise ValueError(f"sample of {n} tokens does not fit a row of {max_len}; truncate it first")
        k = bisect.bisect_left(room, (n, -1))  # the tightest row with at least n free tokens
        if k < len(room):
            _, index = room.pop(k)
        else:
            index = len(rows)
            rows.append({"input_ids": [], "labels": [], "segment_ids": [], "position_ids": []})
        row = rows[index]
        segment = (row["segment_ids"][-1] if row["segment_ids"] else 0) + 1
        row["input_ids"] += sample["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(sample["labels"][1:])
        row["segment_ids"] += [segment] * n
        row["position_ids"] += list(range(n))
        if len(row["input_ids"]) < max_len:
            bisect.insort(room, (max_len - len(row["input_ids"]), index))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Everything at once (what the trainer calls)
# ----------------------------------------------------------------------------------------------------------
def load_sft_data(path, tokenizer, max_len: int, val_path=None, val_fraction: float = 0.1, seed: int = 0,
                  fmt: str = "auto", on_error: str = "stop", overlong: str = "truncate",
                  train_on_prompt: bool = False, packing: bool = False,
                  fields: SFTFields = SFTFields()) -> tuple[list[dict], list[dict], SFTStats]:
    """(train samples, validation samples, stats) ready for data.pad_collate.

    Conversations (not tokens) are split, seeded; with `val_path` that file is the validation set. With
    packing, both sets are packed into rows of max_len.
    """
    if tokenizer.chat_template is None:
        raise MiniloraError(f"the tokenizer of {tokenizer.name_or_path} has no chat template: SFT renders every "
                            "conversation with it (use an instruct model or add \"chat_template\" to its "
                            "tokenizer_config.json)")
    stats = SFTStats()
    conversations = load_conversations(path, fmt, on_error, fields, stats)
    if val_path is not None:
        train_conv, val_conv = conversations, load_conversations(val_path, fmt, on_error, fields, stats)
    else:
        train_conv, val_conv = split_train_val(conversations, val_fraction, seed, what=f"data file {path}")
    options = dict(max_len=max_len, overlong=overlong, train_on_prompt=train_on_prompt, on_error=on_error,
                   stats=stats)
    train = build_sft_samples(tokenizer, train_conv, **options)
    val = build_sft_samples(tokenizer, val_conv, **options) if val_conv else []
    if not train:
        raise MiniloraError(f"data file {path} gives no training sample ({stats.summary()}; "
                            f"first problems: {'; '.join(stats.examples) or 'none'})")
    if stats.empty_replies:
        stats.warnings.append(f"{stats.empty_replies} assistant replies are empty or whitespace only (the first at "
                              f"{stats.first_empty_reply}): they teach the model to answer nothing; fix or remove "
                              "them")
    if not train_on_prompt and (warning := end_of_turn_warning(tokenizer)) is not None:
        stats.warnings.append(warning)
    if packing:
        train, val = pack_samples(train, max_len), pack_samples(val, max_len)
    return train, val, stats
