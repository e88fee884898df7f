"""A Hugging Face tokenizer folder read with the `tokenizers` library alone (no transformers at run time).

A model folder from the hub describes its tokenizer in up to five files; this module reads them the way
transformers 5 does, so `encode`/`decode` give the same ids and text as `AutoTokenizer`:

- `tokenizer.json` (required): the whole pipeline — normaliser, pre-tokeniser, model (BPE/Unigram/WordPiece),
  post-processor, decoder and the added tokens. It is loaded as is by `tokenizers.Tokenizer`.
- `tokenizer_config.json`: the named special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`, as a
  string or an AddedToken dict `{"content": ...}`), `chat_template` (a string or a list of
  `{"name", "template"}`), `added_tokens_decoder`, `clean_up_tokenization_spaces`.
- `special_tokens_map.json`: the older place for the named special tokens (read, as transformers does, only when
  tokenizer_config.json has no `added_tokens_decoder`; its values win over the config's).
- `chat_template.jinja` (and `additional_chat_templates/*.jinja`): templates kept outside the config; the file
  wins over the config's `chat_template`.
- `generation_config.json`: `eos_token_id`, one id or a list (Llama 3 stops at `<|end_of_text|>` and at
  `<|eot_id|>`), collected in `eos_token_ids` for generation.

Whether BOS (or EOS) is added by `encode(text)`: tokenizer.json's post-processor decides. Llama 3 and Llama 2
files carry a TemplateProcessing `"<s> $A"`; Qwen 2's carries only a ByteLevel step, so no BOS. transformers 5
ignores `add_bos_token`/`add_eos_token` of tokenizer_config.json whenever tokenizer.json exists (it pops them
before building the tokenizer), and so does minilora; `add_bos_token` below reports what the post-processor does.

`apply_chat_template` renders the model's chat template with minilora's own engine (chat_template.py) and
encodes the text *without* adding special tokens: the template already writes BOS where the model expects it,
so adding it again would give the double BOS that transformers also avoids.

One known difference: transformers 5 rebuilds the pipeline of a few tokenizer classes (LlamaTokenizer,
GemmaTokenizer, Qwen2Tokenizer) in Python from the vocabulary alone. For current hub files that pipeline equals
tokenizer.json. For older Llama 2 / Mistral v0.1-v0.2 files (a `Prepend("▁")` normaliser) with `legacy: false`,
transformers 5 puts no "▁" before text that follows a special token ("<s>[INST]" → "<s>", "[", ...) while the
file itself — and transformers 4, and Meta's reference tokenisation — gives "<s>", "▁[", ...; minilora follows
the file.

Deliberately not handled: folders with only a SentencePiece `tokenizer.model` or a `vocab.json` + `merges.txt`
(convert them with transformers once: `AutoTokenizer.from_pretrained(d).save_pretrained(d)`), pairs of
sequences, and padding/truncation inside the tokenizer (data.py and sft.py do those).
"""

from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from .errors import MiniloraError
from .files import read_json_object

# The named special tokens a template may use (transformers passes each one that is set to the template).
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# ----------------------------------------------------------------------------------------------------------
# Reading the files
# ----------------------------------------------------------------------------------------------------------
def _read_json(path: Path, required: bool = False) -> dict | None:
    """A JSON file as a dict; None when it is absent and optional. Corrupt files name themselves."""
    if not path.is_file():
        if required:
            raise MiniloraError(f"{path} not found: a tokenizer folder needs tokenizer.json "
                                "(save one with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))")
        return None
    return read_json_object(path, hint="re-download or re-save the tokenizer")


def _token_content(value, where: str) -> str | None:
    """A special token given as a string, an AddedToken dict {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise MiniloraError(f"{where}: expected a string or {{\"content\": ...}}, found {value!r}")


def _added_token(value, special: bool) -> AddedToken:
    """An AddedToken from a config entry (a string, or a dict with content/lstrip/rstrip/normalized)."""
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=False)
    flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
    return AddedToken(value["content"], special=special, **flags)


def _read_chat_templates(folder: Path, config: dict) -> dict[str, str]:
    """Named chat templates: config string/list, overridden by chat_template.jinja, plus additional ones."""
    templates: dict[str, str] = {}
    value = config.get("chat_template")
    if isinstance(value, str):
        templates["default"] = value
    elif isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise MiniloraError(f"{folder / 'tokenizer_config.json'}: chat_template list entries need "
                                    f"\"name\" and \"template\" strings, found {entry!r}")
            templates[entry["name"]] = entry["template"]
    elif value is not None:
        raise MiniloraError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list, "
                            f"found {type(value).__name__}")
    for path in [folder / "chat_template.jinja", *sorted((folder / "additional_chat_templates").glob("*.jinja"))]:
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise MiniloraError(f"{path} is not UTF-8 text ({e})") from None
            templates["default" if path.name == "chat_template.jinja" else path.stem] = text
    return templates


def _generation_eos_ids(folder: Path) -> list[int]:
    path = folder / "generation_config.json"
    value = (_read_json(path) or {}).get("eos_token_id")
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise MiniloraError(f"{path}: eos_token_id must be an integer or a list of integers, found {value!r}")
    return ids


# ----------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------
class Tokenizer:
    """Text ↔ token ids for one model, plus its special tokens and chat template. Build with from_pretrained."""

    def __init__(self, backend: BackendTokenizer, special_tokens: dict[str, str | None],
                 chat_templates: dict[str, str] | None = None, generation_eos_ids: list[int] | None = None,
                 clean_up_tokenization_spaces: bool = False, name_or_path: str = ""):
        self.backend = backend  # the tokenizers.Tokenizer doing the work
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.chat_templates = dict(chat_templates or {})
        self.chat_template: str | None = self.chat_templates.get("default")
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = name_or_path

        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.unk_token = self.special_tokens.get("unk_token")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        eos_ids = list(generation_eos_ids or [])
        tokenizer_eos = self.token_to_id(self.eos_token)
        # eos_token_id: the tokenizer's own EOS (what transformers reports); eos_token_ids: every id that ends
        # generation (generation_config.json's list, plus the tokenizer's EOS if that list lacks it).
        self.eos_token_id = tokenizer_eos if tokenizer_eos is not None else (eos_ids[0] if eos_ids else None)
        if self.eos_token_id is not None and self.eos_token_id not in eos_ids:
            eos_ids.append(self.eos_token_id)
        self.eos_token_ids: list[int] = eos_ids
        # What the post-processor does to a one-token text: does it put BOS in front / EOS behind?
        probe = self.backend.encode("a", add_special_tokens=True).ids
        self.add_bos_token = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        self.add_eos_token = self.eos_token_id is not None and probe[-1:] == [self.eos_token_id]

    # --- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """Read a Hugging Face tokenizer folder (or the path of its tokenizer.json)."""
        folder = Path(path)
        if folder.is_file() and folder.name.endswith(".json"):
            folder = folder.parent
        if not folder.is_dir():
            raise MiniloraError(f"tokenizer folder {path} not found")
        tokenizer_file = folder / "tokenizer.json"
        _read_json(tokenizer_file, required=True)  # names the file if it is missing or not JSON
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a plain Exception for a malformed pipeline
            raise MiniloraError(f"{tokenizer_file} could not be loaded by `tokenizers`: {e}") from None
        config = _read_json(folder / "tokenizer_config.json") or {}
        special_map = _read_json(folder / "special_tokens_map.json") or {}

        # Named special tokens: tokenizer_config.json; special_tokens_map.json wins when the config is of the
        # older kind without added_tokens_decoder (transformers' legacy path).
        raw = {name: config.get(name) for name in SPECIAL_NAMES}
        if "added_tokens_decoder" not in config:
            raw.update({name: special_map[name] for name in SPECIAL_NAMES if name in special_map})
        padding = backend.padding
        if raw.get("pad_token") is None and padding is not None:
            raw["pad_token"] = padding.get("pad_token")  # a pad token baked into tokenizer.json
        where = f"{folder / 'tokenizer_config.json'}"
        special = {name: _token_content(value, f"{where} {name}") for name, value in raw.items()}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        _register_added_tokens(backend, config, raw, extra, where)

        # The ids must come back raw: transformers turns off any padding/truncation saved in tokenizer.json.
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, special, chat_templates=_read_chat_templates(folder, config),
                   generation_eos_ids=_generation_eos_ids(folder),
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                   name_or_path=str(path))

    # --- text <-> ids --------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens the post-processor may add BOS/EOS (see add_bos_token)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[tuple]]:
        """Token ids and, for each token, the (start, end) character span of `text` it came from."""
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; skip_special_tokens drops the added tokens marked special (BOS, EOS, <|im_end|>...)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # transformers 5 applies its old WordPiece clean-up (" ." -> ".") only to non-BPE tokenizers.
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                                  (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # --- chat ----------------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    chat_template: str | None = None, **extra) -> str:
        """The conversation as text, through the model's chat template (or the one given)."""
        from .chat_template import render_chat_template

        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            names = ", ".join(sorted(self.chat_templates)) or "none"
            raise MiniloraError(f"tokenizer {self.name_or_path} has no default chat template (named templates: "
                                f"{names}); set \"chat_template\" in tokenizer_config.json or use a chat model")
        # As transformers does: keys whose value is None are dropped, every set special token is visible to the
        # template, and `tools`/`documents` are defined (as none) so `tools is not none` tests behave the same.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {k: v for k, v in self.special_tokens.items() if k not in ("bos_token", "eos_token")}
        variables.update(tools=None, documents=None)
        variables.update(extra)
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **variables)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, **extra) -> list[int] | str:
        """Render the conversation with the chat template; token ids (no special tokens added again) or text."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, eos_token_ids={self.eos_token_ids}, add_bos_token={self.add_bos_token})")


def _register_added_tokens(backend: BackendTokenizer, config: dict, raw_special: dict, extra: list,
                           where: str) -> None:
    """Add the tokens the config declares but tokenizer.json lacks, as transformers does on loading.

    Named special tokens (bos/eos/pad...) and additional special tokens that are not yet added tokens become
    special added tokens, so they are matched whole in raw text and skipped by decode(skip_special_tokens=True).
    """
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    to_add = []
    for index, value in (config.get("added_tokens_decoder") or {}).items():
        if not isinstance(value, dict) or not isinstance(value.get("content"), str):
            raise MiniloraError(f"{where}: added_tokens_decoder[{index}] should be {{\"content\": ...}}, "
                                f"found {value!r}")
        if value["content"] not in present:
            to_add.append(_added_token(value, special=bool(value.get("special", False))))
            present.add(value["content"])
    for value in [*raw_special.values(), *extra]:
        if value is None:
            continue
        content = _token_content(value, where)
        if content not in present:
            to_add.append(_added_token(value, special=True))
            present.add(content)
    if to_add:
        backend.add_tokens(to_add)


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder (see Tokenizer.from_pretrained), or of a GGUF file or a folder
    holding one (formats/gguf_tokenizer.py rebuilds it from the file's tokenizer.ggml.* metadata)."""
    from .formats.gguf_read import find_gguf

    if find_gguf(path) is not None:
        from .formats.gguf_tokenizer import read_gguf_tokenizer

        return Tokenizer(**read_gguf_tokenizer(path))
    return Tokenizer.from_pretrained(path)


def check_fits_embedding(tokenizer: Tokenizer, vocab_size: int, model_dir) -> None:
    """MiniloraError when the tokenizer can produce an id the model has no embedding row for.

    Such an id would be an IndexError deep in the embedding lookup at the first batch that holds it. It happens
    when tokenizer_config.json names a pad_token (or additional special tokens) that tokenizer.json lacks: they are
    added after the last id, as transformers adds them, which only works once the embedding is resized. A model
    may have more rows than the tokenizer has ids (padded to a multiple of 64, as Qwen's are): that is fine.
    """
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)  # {token: id}
    past = sorted((i, t) for t, i in vocab.items() if i >= vocab_size)
    if not past:
        return
    names = {content: name for name, content in tokenizer.special_tokens.items()}
    shown = ", ".join(f"{t!r} (id {i}" + (f", {names[t]} in tokenizer_config.json)" if t in names else ")")
                      for i, t in past[:3]) + (f" and {len(past) - 3} more" if len(past) > 3 else "")
    raise MiniloraError(
        f"{model_dir}: the tokenizer has {len(past)} token id(s) past the model's embedding ({vocab_size} rows, "
        f"vocab_size in config.json): {shown}; remove such tokens from tokenizer_config.json (a pad_token or "
        "additional special token missing from tokenizer.json is added after the last id) or use the tokenizer "
        "this model was saved with (or resize its embedding with transformers and save both)")
