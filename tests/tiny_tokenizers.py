"""Tiny tokenizers trained here with `tokenizers`, saved as Hugging Face tokenizer folders for the tests.

Real checkpoints carry one of two tokenizer families, and minilora must read both exactly as transformers does:

- **byte-level BPE** (GPT-2 / Llama 3 / Qwen 2): text is split by a regex, every byte is mapped to a printable
  character, BPE merges run inside each piece. Llama 3 adds `<|begin_of_text|>` through a TemplateProcessing
  post-processor; Qwen 2 adds nothing (no BOS at all).
- **SentencePiece-style BPE with Metaspace** (Llama 2 / Mistral / Gemma): spaces become "▁", unknown characters
  fall back to byte tokens `<0xEA>` (byte fallback), the decoder turns both back.

Each builder writes tokenizer.json + tokenizer_config.json + special_tokens_map.json + generation_config.json
into a folder that `transformers.AutoTokenizer.from_pretrained` also loads, so tests can compare the two.
transformers 5 rebuilds the pipeline of some tokenizer classes (LlamaTokenizer, GemmaTokenizer, Qwen2Tokenizer)
in Python from the vocabulary and merges alone; the tokenizer.json written here uses exactly the pipeline each
of those classes builds, so both readings agree (as they do for the real checkpoints).

Training takes a few milliseconds per tokenizer (the corpus below is ~3 KB of original Korean and English text);
the result is cached per process. Every tokenizer knows the special tokens of all chat-template families the
tests use, so any fixture template can be set on any of them.

Usage:
    path = build_byte_level_bpe(tmp_path / "tok")                   # Llama 3 style
    path = build_byte_level_bpe(tmp_path / "tok", style="qwen2")    # no BOS, NFC normaliser
    path = build_metaspace_bpe(tmp_path / "tok")                    # Llama 2 style, byte fallback
    path = build_metaspace_bpe(tmp_path / "tok", style="gemma")     # Gemma style
    set_chat_template(path, template, bos_token="<bos>", eos_token="<eos>")
"""

import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

# Original text written for these tests: everyday English and Korean, so common words and Hangul syllables
# become single tokens (a Korean syllable is 3 UTF-8 bytes; without merges it would cost 3 byte tokens).
CORPUS = [
    "The capital of France is Paris. The capital of Korea is Seoul.",
    "A small garden grows tomatoes, beans and green tea in the spring.",
    "Please answer the question in one short sentence.",
    "The model learns to predict the next token from the tokens before it.",
    "Fine-tuning changes a few weights so the model follows instructions.",
    "Low-rank adapters add two thin matrices next to a frozen weight.",
    "How many people live in Seoul? About ten million people live there.",
    "Write a haiku about the sea. Waves fold into foam, the gulls call, the tide returns.",
    "What is two plus two? Two plus two is four.",
    "Tea is picked in May, dried in the shade, and rolled by hand.",
    "The assistant answers politely and stops when the answer is complete.",
    "Numbers like 2024, 3.14 and 1,000,000 appear in text too.",
    "Code: def add(a, b): return a + b  # adds two numbers",
    "안녕하세요. 만나서 반갑습니다.",
    "프랑스의 수도는 파리입니다. 한국의 수도는 서울입니다.",
    "봄이 오면 정원에서 토마토와 콩과 녹차를 키웁니다.",
    "질문에 한 문장으로 짧게 대답해 주세요.",
    "모델은 앞의 토큰들을 보고 다음 토큰을 예측하도록 배웁니다.",
    "미세 조정은 모델이 지시를 따르도록 가중치 일부를 바꿉니다.",
    "서울에는 약 천만 명의 사람들이 살고 있습니다.",
    "차는 오월에 따서 그늘에서 말리고 손으로 비빕니다.",
    "오늘 날씨가 좋아서 공원에 산책을 갔습니다.",
    "이 문장은 한국어 토큰화를 시험하기 위한 예시입니다.",
    "감사합니다! 좋은 하루 보내세요.",
    "답은 항상 JSON 형식으로 주세요: {\"answer\": \"네\"}",
]

# Special tokens of every chat-template family in the fixtures, so any of their templates can be set on any
# tokenizer built here and its markers stay single tokens.
CHAT_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # llama 3
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",  # qwen / chatml
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",  # gemma
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",  # phi-3
    "<s>", "</s>", "<unk>", "<pad>",  # llama 2 / mistral
]

# The pre-tokenisation regex of Llama 3's tokenizer.json (and, with \p{N} instead of \p{N}{1,3}, Qwen 2's).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Per style: tokenizer_config.json's class and named tokens, and the ids generation_config.json lists as eos.
STYLES = {
    "llama3": dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|begin_of_text|>",
                   eos_token="<|eot_id|>", pad_token=None, unk_token=None,
                   generation_eos=["<|end_of_text|>", "<|eot_id|>"]),
    "qwen2": dict(tokenizer_class="Qwen2Tokenizer", bos_token=None, eos_token="<|im_end|>",
                  pad_token="<|endoftext|>", unk_token=None, generation_eos=["<|im_end|>", "<|endoftext|>"]),
    "llama": dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", pad_token=None,
                  unk_token="<unk>", generation_eos=["</s>"], add_bos_token=True, add_eos_token=False,
                  legacy=False),
    "gemma": dict(tokenizer_class="GemmaTokenizer", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                  unk_token="<unk>", generation_eos=["<eos>", "<end_of_turn>"], add_bos_token=True,
                  add_eos_token=False),
}


# ----------------------------------------------------------------------------------------------------------
# Training (cached: the same tokenizer.json string for every test of a session)
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _byte_level_json(style: str, vocab_size: int) -> str:
    pattern = QWEN2_PATTERN if style == "qwen2" else LLAMA3_PATTERN
    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # trim_offsets=False as in Llama 3 / Qwen 2: a token's offsets include its leading space.
    byte_level = processors.ByteLevel(trim_offsets=False, add_prefix_space=False, use_regex=False)
    if style == "llama3":
        bos = STYLES[style]["bos_token"]
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, tok.token_to_id(bos))])
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    return tok.to_str()


@functools.lru_cache(maxsize=None)
def _metaspace_json(style: str, vocab_size: int) -> str:
    # Train with whitespace splitting so no merge crosses a word boundary (as SentencePiece trains), then
    # save the pipeline the transformers class builds (Llama: Metaspace prepend "first", no split; Gemma:
    # spaces replaced by "▁" and no pre-tokenisation at all).
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[])
    text = CORPUS if style == "gemma" else [" " + line for line in CORPUS]  # llama: text starts with "▁"
    trainer_tok.train_from_iterator(text, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    # Vocabulary: the special tokens, the 256 byte-fallback tokens <0x00>..<0xFF>, then the learned pieces.
    specials = ["<unk>", "<s>", "</s>"] if style == "llama" else ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    specials += [t for t in CHAT_SPECIAL_TOKENS if t not in specials]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p in sorted(trained["vocab"], key=trained["vocab"].get) if p not in pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    if style == "llama":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    else:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                   unk_token="<unk>"))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = STYLES[style]["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    return tok.to_str()


# ----------------------------------------------------------------------------------------------------------
# Writing a Hugging Face tokenizer folder
# ----------------------------------------------------------------------------------------------------------
def _write_folder(out_dir: Path, tokenizer_json: str, style: str, chat_template: str | None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    tok = Tokenizer.from_str(tokenizer_json)
    info = dict(STYLES[style])
    generation_eos = [tok.token_to_id(t) for t in info.pop("generation_eos")]
    named = {k: info[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if info[k] is not None}
    config = {**{k: v for k, v in info.items() if v is not None}, "model_max_length": 2048,
              "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(named, indent=2), "utf-8")
    generation = {"eos_token_id": generation_eos if len(generation_eos) > 1 else generation_eos[0]}
    if info["bos_token"] is not None:
        generation["bos_token_id"] = tok.token_to_id(info["bos_token"])
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2), "utf-8")
    return out_dir


def build_byte_level_bpe(out_dir, style: str = "llama3", vocab_size: int = 700,
                         chat_template: str | None = None) -> Path:
    """A byte-level BPE tokenizer folder: style "llama3" (BOS by post-processor) or "qwen2" (no BOS)."""
    assert style in ("llama3", "qwen2"), style
    return _write_folder(out_dir, _byte_level_json(style, vocab_size), style, chat_template)


def build_metaspace_bpe(out_dir, style: str = "llama", vocab_size: int = 700,
                        chat_template: str | None = None) -> Path:
    """A SentencePiece-style BPE tokenizer folder with byte fallback: style "llama" (Llama 2) or "gemma"."""
    assert style in ("llama", "gemma"), style
    return _write_folder(out_dir, _metaspace_json(style, vocab_size), style, chat_template)


def set_chat_template(path, chat_template: str | None, bos_token: str | None = None,
                      eos_token: str | None = None) -> Path:
    """Rewrite tokenizer_config.json with another chat template (and, if given, bos/eos token strings)."""
    path = Path(path)
    config = json.loads((path / "tokenizer_config.json").read_text("utf-8"))
    config["chat_template"] = chat_template
    if bos_token is not None:
        config["bos_token"] = bos_token
    if eos_token is not None:
        config["eos_token"] = eos_token
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")
    special = {k: v for k, v in config.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2), "utf-8")
    return path
