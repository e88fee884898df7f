"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers` pipeline (tokenizer.py wraps it in a Tokenizer).

A GGUF file carries no tokenizer.json. llama.cpp's converter stores the vocabulary as metadata instead:

    tokenizer.ggml.model         "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback)
    tokenizer.ggml.pre           the pre-tokenizer's name ("llama-bpe", "qwen2", "smollm", ...), byte-level only
    tokenizer.ggml.tokens        one string per id; token_type per id: 1 normal, 2 unknown, 3 control, 4 user
                                 defined, 5 unused, 6 byte (<0x41>)
    tokenizer.ggml.merges        "a b" pairs, best first (byte-level; SentencePiece files usually have none...)
    tokenizer.ggml.scores        ...and a score per token instead, from which the merges are rebuilt
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token, add_space_prefix
    tokenizer.chat_template      the Jinja chat template

The pipeline built here is the one transformers' GGUF loader builds (our test oracle), piece by piece:
- byte-level: BPE over the GPT-2 byte alphabet (tokens written in raw UTF-8 are re-spelled into it); pre-tokenizer
  ByteLevel with GPT-2's split regex, or, for the pre-tokenizer names listed in SPLITS, that regex then ByteLevel;
  no BOS unless add_bos_token says so;
- SentencePiece ("llama"): BPE with byte fallback; merges from the file or rebuilt from the scores (ordered by
  score, then by the lengths of the two halves); a Metaspace pre-tokenizer that puts "▁" before the first word;
  BOS added unless add_bos_token is false. Gemma files: tokens made of spaces are respelled as "▁"s, merges
  rebuilt in file order, spaces turned into "▁" by a normaliser and no prefix "▁". Phi-3: the "▁" comes from a
  normaliser (Prepend + Replace), not from a pre-tokenizer.
- control tokens (type 3) become special added tokens (matched whole, skipped by decode(skip_special_tokens));
  user-defined ones (type 4) plain added tokens; the named bos/eos/unk/pad tokens special ones.
One deliberate difference: `add_space_prefix = false` on a SentencePiece vocabulary is honoured (no "▁" before
the first word), as llama.cpp does; transformers ignores the flag.

Generation stops at the EOS token and also at `eot_token_id` / `eom_token_id` when the file names them (llama.cpp
stops at every end-of-generation token: Llama 3's <|eot_id|>, for example).

Not handled: "t5"/Unigram, "bert"/WordPiece, "rwkv" and other tokenizer models (a MiniloraError names them);
pre-tokenizer names outside SPLITS fall back to GPT-2's split, as in transformers.
"""

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from ..errors import MiniloraError
from .gguf_read import GGUFFile, check_tokenizer_size, find_gguf

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
SUPPORTED_MODELS = ("gpt2", "llama")

# Split regexes by tokenizer.ggml.pre name (the facts transformers' gguf_tokenizer_mapping.py and llama.cpp's
# llama-vocab.cpp agree on). Any other name: ByteLevel's own GPT-2 regex.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O),
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable bytes stand for themselves, the other 68 are shifted
    to chr(256 + n), so every byte string is a string of visible characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def merges_from_scores(tokens: list[str], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Rebuild BPE merges from a vocabulary: every split of a token into two tokens is a merge, best score first.

    Ties are broken by the lengths of the two halves, then by their ids (as transformers' generate_merges does,
    so the same vocabulary gives the same merge order).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _split_merges(f: GGUFFile, merges: list[str]) -> list[tuple[str, str]]:
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise MiniloraError(f"{f.path}: tokenizer.ggml.merges entry {bad!r} is not two tokens separated by a space")
    return pairs


def _byte_level(f: GGUFFile, tokens: list[str]) -> BackendTokenizer:
    """GPT-2-style byte-level BPE (tokenizer.ggml.model = "gpt2")."""
    alphabet = byte_alphabet()
    letters = set(alphabet.values())
    vocab = {t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = f.metadata.get("tokenizer.ggml.merges")
    merges = _split_merges(f, merges) if merges is not None else merges_from_scores(list(vocab), vocab)
    backend = BackendTokenizer(BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False))
    split = SPLITS.get(f.metadata.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(f: GGUFFile, tokens: list[str]) -> BackendTokenizer:
    """SentencePiece-style BPE with byte fallback (tokenizer.ggml.model = "llama"), per architecture."""
    arch = f.architecture
    gemma = arch in ("gemma", "gemma2", "gemma3")
    if gemma:  # tokens of 2+ spaces are stored as spaces, but looked up (after the normaliser) as "▁"s
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = f.metadata.get("tokenizer.ggml.merges")
    if merges is not None:
        merges = _split_merges(f, merges)
    elif gemma:  # Gemma's scores do not follow its merge order; the order of the tokens in the file does
        merges = merges_from_scores(tokens, {t: -i for i, t in enumerate(tokens)})
    else:
        scores = f.metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise MiniloraError(f"{f.path}: a SentencePiece vocabulary needs tokenizer.ggml.merges or one "
                                f"tokenizer.ggml.scores entry per token")
        merges = merges_from_scores(tokens, dict(zip(tokens, scores)))
    unk_id = f.metadata.get("tokenizer.ggml.unknown_token_id")
    unk = {"unk_token": tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else "<unk>"} \
        if gemma else {}
    backend = BackendTokenizer(BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None, **unk))
    prefix = f.metadata.get("tokenizer.ggml.add_space_prefix", True) is not False
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif arch == "phi3":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                         split=False)
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def gguf_tokenizer_parts(f: GGUFFile) -> dict:
    """The keyword arguments of tokenizer.Tokenizer for an opened GGUF file (see the module docstring).

    Parts rather than a Tokenizer, so that this module never imports tokenizer.py (which imports it).
    """
    meta = f.metadata
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise MiniloraError(f"{f.path}: no tokenizer in the file (tokenizer.ggml.model / tokenizer.ggml.tokens "
                            "missing)")
    if model not in SUPPORTED_MODELS:
        raise MiniloraError(f"{f.path}: tokenizer.ggml.model {model!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_MODELS)}")
    if "token_embd.weight" in f.tensors:
        check_tokenizer_size(f, f.shape("token_embd.weight")[0])
    backend = _byte_level(f, tokens) if model == "gpt2" else _sentencepiece(f, tokens)

    # Added tokens: control -> special, user-defined -> plain (both matched whole in raw text).
    types = meta.get("tokenizer.ggml.token_type") or []
    letters = set(byte_alphabet().values())
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
               if kind == CONTROL and (model != "gpt2" or set(t) <= letters)]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
            if kind == USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)

    special = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None:
            continue
        if not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
            raise MiniloraError(f"{f.path}: tokenizer.ggml.{key}_token_id {token_id!r} is not an id of the "
                                f"{len(tokens)}-token vocabulary")
        special[name] = tokens[token_id]
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    named = [AddedToken(t, special=True) for t in dict.fromkeys(special.values()) if t not in present]
    if named:
        backend.add_tokens(named)

    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama") and "bos_token" in special
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and "eos_token" in special
    bos, eos = special.get("bos_token"), special.get("eos_token")
    single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])])
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on])

    stop_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                  "tokenizer.ggml.eom_token_id") if isinstance(meta.get(k), int)]
    template = meta.get("tokenizer.chat_template")
    templates = {"default": template} if isinstance(template, str) else {}
    for key, value in meta.items():  # named templates: tokenizer.chat_template.<name>
        if key.startswith("tokenizer.chat_template.") and isinstance(value, str):
            templates[key.removeprefix("tokenizer.chat_template.")] = value
    return dict(backend=backend, special_tokens=special, chat_templates=templates,
                generation_eos_ids=list(dict.fromkeys(stop_ids)), name_or_path=str(f.path))


def read_gguf_tokenizer(path) -> dict:
    """gguf_tokenizer_parts of a .gguf file, or of the one .gguf file in a folder."""
    file = find_gguf(path)
    if file is None:
        raise MiniloraError(f"{path} is not a .gguf file or a folder holding one")
    return gguf_tokenizer_parts(GGUFFile(file))


def write_tokenizer_files(tokenizer, out_dir) -> list[str]:
    """Write a Tokenizer (e.g. one read from a GGUF file) as a Hugging Face tokenizer folder in `out_dir`:
    tokenizer.json (the whole pipeline, BOS/EOS post-processor included), tokenizer_config.json (the named special
    tokens, the chat template) and generation_config.json (every stop id), each atomically. Returns the names.

    What a safetensors export of a GGUF-loaded model needs beside its weights (a GGUF file has no companion files
    to copy); minilora and transformers read the folder back to the same ids and template.
    """
    from pathlib import Path

    from ..files import write_json, write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "tokenizer.json", tokenizer.backend.to_str())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000, **tokenizer.special_tokens}
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    write_json(out_dir / "tokenizer_config.json", config)
    names = ["tokenizer.json", "tokenizer_config.json"]
    if tokenizer.eos_token_ids:
        ids = tokenizer.eos_token_ids
        generation = {"eos_token_id": ids if len(ids) > 1 else ids[0]}
        if tokenizer.bos_token_id is not None:
            generation["bos_token_id"] = tokenizer.bos_token_id
        write_json(out_dir / "generation_config.json", generation)
        names.append("generation_config.json")
    return names
