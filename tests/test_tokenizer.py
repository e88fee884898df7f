"""minilora.tokenizer against transformers' AutoTokenizer (the oracle), on tokenizers from tests/tiny_tokenizers.py.

Four styles cover the two families real checkpoints use: byte-level BPE with a BOS post-processor (Llama 3) and
without BOS (Qwen 2), SentencePiece-style Metaspace BPE with byte fallback (Llama 2 / Mistral, Gemma). Every
comparison is exact: the same ids, the same decoded text.
"""

import json
import re
import shutil
import unicodedata

import pytest
from conftest import FIXTURES
from tiny_tokenizers import build_byte_level_bpe, build_metaspace_bpe, set_chat_template

from minilora.errors import MiniloraError
from minilora.tokenizer import Tokenizer, load_tokenizer

STYLES = ("llama3", "qwen2", "llama", "gemma")
TEXTS = [
    "The capital of France is Paris.",
    "Hello world",  # words the corpus never saw: single letters / bytes
    "프랑스의 수도는 파리입니다.",  # Korean from the training text
    "뷁 똠얌꿍 쀍",  # Korean syllables the corpus never saw: byte fallback / byte-level pieces
    "Korean 한국어 mixed 2024년 3.14",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\tindented\r\n",
    "<s>text</s> <|im_end|> and <bos> <end_of_turn> written in text",
    "e\u0301 café ﬁ",  # combining accent (NFC in Qwen 2 composes it), a ligature
    "😀 emoji and ∑ symbols",
    "",
    " ",
]
TEMPLATE_FAMILIES = ["gemma", "gemma-2", "gemma-3", "llama-2-chat", "llama-3-instruct", "llama-3.1-instruct",
                     "llama-3.2-instruct", "mistral-instruct-v0.1", "mistral-instruct-v0.1-legacy",
                     "mistral-instruct-v0.2", "mistral-instruct-v0.3", "qwen2-instruct", "qwen2.5-instruct",
                     "smollm2-instruct", "phi-3-mini", "phi-3.5-mini", "zephyr", "tinyllama-chat",
                     "alpaca-style", "vicuna-style"]
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "Paris."}],
    "system": [{"role": "system", "content": "Answer in one word."},
               {"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "Paris."}],
    "multi_korean": [{"role": "user", "content": "한국의 수도는?"},
                     {"role": "assistant", "content": " 서울입니다. "},
                     {"role": "user", "content": "How many people live there?"},
                     {"role": "assistant", "content": "About ten million."}],
    "prompt_only": [{"role": "user", "content": "Write a haiku about the sea."}],
}


def build(style, path, **kwargs):
    builder = build_byte_level_bpe if style in ("llama3", "qwen2") else build_metaspace_bpe
    return builder(path, style=style, **kwargs)


def auto_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {style: build(style, root / style) for style in STYLES}


@pytest.fixture(scope="module")
def pairs(folders):
    """(minilora tokenizer, transformers tokenizer) per style."""
    return {style: (load_tokenizer(path), auto_tokenizer(path)) for style, path in folders.items()}


# ----------------------------------------------------------------------------------------------------------
# encode / decode / special tokens against AutoTokenizer
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pairs, style, add_special_tokens):
    ours, hf = pairs[style]
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens), text
    assert ours.encode_batch(TEXTS, add_special_tokens) == [hf.encode(t, add_special_tokens=add_special_tokens)
                                                            for t in TEXTS]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(pairs, style, skip_special_tokens):
    import random

    ours, hf = pairs[style]
    sequences = [hf.encode(t) for t in TEXTS]
    # Awkward id sequences too: random ids (half a Korean syllable's bytes, specials in the middle...).
    rng = random.Random(0)
    sequences += [[rng.randrange(len(hf)) for _ in range(n)] for n in (1, 5, 40)]
    for ids in sequences:
        assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("style", STYLES)
def test_special_tokens_match_transformers(pairs, folders, style):
    ours, hf = pairs[style]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                           hf.pad_token_id)
    assert ours.vocab_size == len(hf) == len(ours)
    assert ours.add_bos_token == (hf.encode("a")[:1] == [hf.bos_token_id]) == (style != "qwen2")
    # generation_config.json's eos list (several ids for Llama 3 / Qwen 2 / Gemma), the tokenizer's EOS included
    generation = json.loads((folders[style] / "generation_config.json").read_text())["eos_token_id"]
    generation = generation if isinstance(generation, list) else [generation]
    assert set(ours.eos_token_ids) == set(generation) | {hf.eos_token_id}
    assert ours.token_to_id(ours.eos_token) == ours.eos_token_id
    assert ours.id_to_token(ours.eos_token_id) == ours.eos_token


@pytest.mark.parametrize("style", STYLES)
def test_korean_tokenizes_sensibly_and_round_trips(pairs, style):
    ours, _ = pairs[style]
    seen = "한국의 수도는 서울입니다."  # syllables from the training text: merged into multi-byte tokens
    ids = ours.encode(seen, add_special_tokens=False)
    assert len(ids) < len(seen.encode("utf-8")) / 2
    for text in TEXTS:
        if style == "llama" and text.startswith(" "):
            continue  # Llama's Metaspace adds no "▁" before a leading space, but its decoder strips one anyway
        expected = unicodedata.normalize("NFC", text) if style == "qwen2" else text  # Qwen 2 normalises to NFC
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == expected
    unseen = "뷁"  # never in the corpus: Metaspace styles fall back to its 3 UTF-8 bytes
    if style in ("llama", "gemma"):
        pieces = [ours.id_to_token(i) for i in ours.encode(unseen, add_special_tokens=False)]
        assert pieces[-3:] == ["<0xEB>", "<0xB7>", "<0x81>"]


# ----------------------------------------------------------------------------------------------------------
# tokenizer_config.json variants (each checked against transformers reading the same folder)
# ----------------------------------------------------------------------------------------------------------
def _edit_config(path, **changes):
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def _same_as_transformers(path, texts=TEXTS):
    ours, hf = load_tokenizer(path), auto_tokenizer(path)
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, special) == hf.encode(text, add_special_tokens=special), (text, special)
        ids = hf.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                           hf.pad_token_id)
    return ours, hf


def test_special_tokens_as_added_token_dicts(tmp_path):
    path = build("llama", tmp_path / "tok")
    entry = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _edit_config(path, bos_token={"content": "<s>", **entry}, eos_token={"content": "</s>", **entry},
                 pad_token={"content": "<unk>", **entry})
    ours, _ = _same_as_transformers(path)
    assert (ours.bos_token, ours.eos_token, ours.pad_token_id) == ("<s>", "</s>", 0)


def test_special_tokens_map_overrides_legacy_config(tmp_path):
    path = build("llama3", tmp_path / "tok")
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end_of_text|>", "pad_token": "<pad>"}))
    ours, _ = _same_as_transformers(path)
    assert (ours.eos_token, ours.pad_token) == ("<|end_of_text|>", "<pad>")


def test_add_bos_flags_do_not_override_the_post_processor(tmp_path):
    """transformers 5 drops add_bos_token/add_eos_token when tokenizer.json exists: its post-processor decides."""
    path = build("llama", tmp_path / "tok")
    _edit_config(path, add_bos_token=False, add_eos_token=True)
    ours, _ = _same_as_transformers(path)
    assert ours.add_bos_token and not ours.add_eos_token


def test_no_post_processor_means_no_bos(tmp_path):
    path = build("llama3", tmp_path / "tok")
    data = json.loads((path / "tokenizer.json").read_text())
    data["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(data))
    _edit_config(path, add_bos_token=True)
    ours, _ = _same_as_transformers(path)
    assert not ours.add_bos_token


def test_special_token_missing_from_tokenizer_json_is_added(tmp_path):
    """A config-only special token becomes one special added token, as transformers makes it."""
    path = build("llama3", tmp_path / "tok")
    _edit_config(path, pad_token="<|pad|>", additional_special_tokens=["<|tool|>"])
    ours, hf = _same_as_transformers(path, TEXTS + ["a<|pad|>b <|tool|> c"])
    assert ours.pad_token_id == hf.pad_token_id == len(hf) - 2
    assert ours.decode(ours.encode("x<|tool|>y"), skip_special_tokens=True) == "xy"


def test_tokenizer_json_padding_and_truncation_are_ignored(tmp_path):
    path = build("llama3", tmp_path / "tok")
    data = json.loads((path / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 1,
                       "pad_type_id": 0, "pad_token": "<|end_of_text|>"}
    (path / "tokenizer.json").write_text(json.dumps(data))
    ours, hf = _same_as_transformers(path)
    assert len(ours.encode(TEXTS[0])) > 3 and ours.pad_token == hf.pad_token == "<|end_of_text|>"


def test_generation_config_single_eos_id(tmp_path):
    path = build("llama3", tmp_path / "tok")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    ours = load_tokenizer(path)
    assert ours.eos_token_id == ours.token_to_id("<|eot_id|>") and ours.eos_token_ids == [1, ours.eos_token_id]
    (path / "generation_config.json").unlink()
    assert load_tokenizer(path).eos_token_ids == [ours.eos_token_id]


def test_chat_templates_named_list_and_jinja_file(tmp_path):
    path = build("llama3", tmp_path / "tok")
    _edit_config(path, chat_template=[{"name": "default", "template": "{{ messages[0]['content'] }}"},
                                      {"name": "tool_use", "template": "TOOLS"}])
    ours = load_tokenizer(path)
    assert ours.chat_template == "{{ messages[0]['content'] }}" and ours.chat_templates["tool_use"] == "TOOLS"
    (path / "chat_template.jinja").write_text("FILE {{ messages[0]['content'] }}")
    ours, hf = load_tokenizer(path), auto_tokenizer(path)
    assert ours.chat_template == hf.chat_template == "FILE {{ messages[0]['content'] }}"
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "FILE hi"


# ----------------------------------------------------------------------------------------------------------
# Errors name the file
# ----------------------------------------------------------------------------------------------------------
def test_missing_folder_and_missing_tokenizer_json(tmp_path):
    with pytest.raises(MiniloraError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")
    path = build("llama3", tmp_path / "tok")
    (path / "tokenizer.json").unlink()
    with pytest.raises(MiniloraError, match="tokenizer.json not found"):
        load_tokenizer(path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "generation_config.json"])
def test_corrupt_file_is_named(tmp_path, name):
    path = build("llama3", tmp_path / "tok")
    (path / name).write_text('{"truncated": ')
    with pytest.raises(MiniloraError, match=f"{name} is not valid JSON"):
        load_tokenizer(path)


def test_bad_values_are_named(tmp_path):
    path = build("llama3", tmp_path / "tok")
    (path / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(MiniloraError, match="tokenizer.json could not be loaded"):
        load_tokenizer(path)
    path = build("llama3", tmp_path / "tok2")
    (path / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    with pytest.raises(MiniloraError, match="generation_config.json: eos_token_id"):
        load_tokenizer(path)
    path = build("llama3", tmp_path / "tok3")
    _edit_config(path, chat_template=42)
    with pytest.raises(MiniloraError, match="chat_template must be a string or a list"):
        load_tokenizer(path)


def test_no_chat_template_is_a_clear_error(folders):
    with pytest.raises(MiniloraError, match="no default chat template"):
        load_tokenizer(folders["llama3"]).apply_chat_template([{"role": "user", "content": "hi"}])


# ----------------------------------------------------------------------------------------------------------
# apply_chat_template against transformers, on the real templates of the fixtures
# ----------------------------------------------------------------------------------------------------------
def _fixture(family):
    path = FIXTURES / "chat_templates" / f"{family}.json"
    if not path.is_file():
        pytest.skip(f"fixture {path} not present")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def template_folders(folders, tmp_path_factory):
    """One byte-level and one Metaspace copy per fixture family, with its template and bos/eos strings."""
    root, out = tmp_path_factory.mktemp("templates"), {}
    for family in TEMPLATE_FAMILIES:
        path = FIXTURES / "chat_templates" / f"{family}.json"
        if not path.is_file():
            continue
        fixture = json.loads(path.read_text())
        for style in ("llama3", "llama"):
            folder = root / f"{family}-{style}"
            shutil.copytree(folders[style], folder)
            set_chat_template(folder, fixture["chat_template"], fixture["bos_token"], fixture["eos_token"])
            out[family, style] = folder
    return out


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
@pytest.mark.parametrize("style", ["llama3", "llama"])
def test_apply_chat_template_matches_transformers(template_folders, family, style):
    _fixture(family)
    ours, hf = load_tokenizer(template_folders[family, style]), auto_tokenizer(template_folders[family, style])
    compared = 0
    for name, messages in CONVERSATIONS.items():
        for add_generation_prompt in (False, True):
            try:
                expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
            except Exception as e:  # the template refuses this conversation (Gemma: no system role)
                with pytest.raises(MiniloraError, match=re.escape(str(e)[:30])):
                    ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
                continue
            text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
            ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            assert text == expected, (name, add_generation_prompt)
            assert ids == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 return_dict=False), (name, add_generation_prompt)
            compared += 1
    assert compared >= 4


@pytest.mark.parametrize("family", ["llama-3-instruct", "gemma", "llama-2-chat"])
def test_no_double_bos(template_folders, family):
    """The template writes BOS itself; apply_chat_template must not add a second one."""
    fixture = _fixture(family)
    ours = load_tokenizer(template_folders[family, "llama"])
    ids = ours.apply_chat_template(CONVERSATIONS["single"])
    bos = ours.token_to_id(fixture["bos_token"])
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1


def test_from_pretrained_accepts_the_tokenizer_json_path(folders):
    tok = Tokenizer.from_pretrained(folders["gemma"] / "tokenizer.json")
    assert tok.bos_token == "<bos>" and "Tokenizer(" in repr(tok)


# ----------------------------------------------------------------------------------------------------------
# Token ids the model has no embedding row for: refused when the model and tokenizer are loaded
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, shown", [
    (dict(pad_token="<|my_pad|>"), "'<|my_pad|>' (id 700, pad_token in tokenizer_config.json)"),
    (dict(additional_special_tokens=["<|tool|>", "<|obs|>"]), "'<|tool|>' (id 700), '<|obs|>' (id 701)"),
])
def test_config_only_tokens_past_the_embedding_are_named(tmp_path, changes, shown):
    from minilora.tokenizer import check_fits_embedding

    path = build("llama3", tmp_path / "tok")  # 700 ids: a model sized to it has 700 embedding rows
    check_fits_embedding(load_tokenizer(path), 700, path)  # as saved: fits
    _edit_config(path, **changes)
    tok = load_tokenizer(path)
    assert len(tok) == len(auto_tokenizer(path)) > 700  # transformers adds them after the last id too
    with pytest.raises(MiniloraError) as e:
        check_fits_embedding(tok, 700, path)
    assert str(e.value).startswith(f"{path}: the tokenizer has {len(tok) - 700} token id(s) past the model's "
                                   f"embedding (700 rows, vocab_size in config.json): {shown}; remove such tokens")


def test_a_model_with_more_rows_than_the_tokenizer_is_fine(tmp_path):
    from minilora.tokenizer import check_fits_embedding

    check_fits_embedding(load_tokenizer(build("qwen2", tmp_path / "tok")), 768, tmp_path)  # padded to 64s: fine


@pytest.mark.parametrize("case", ["pad_token", "additional_special_tokens", "tokenizer_larger"])
def test_training_refuses_ids_past_the_embedding_at_load_time(tmp_path, case):
    """Each used to be an IndexError inside the embedding at the first batch holding such an id."""
    from tiny_models import make_tiny_checkpoint

    from minilora.train import train
    from minilora.train_config import TrainConfig

    if case == "tokenizer_larger":  # a 256-row model with a 700-id tokenizer written beside it
        model = make_tiny_checkpoint("llama", tmp_path / "model")
        build("llama3", model)
        expected = "444 token id(s) past the model's embedding (256 rows"
    else:
        model = make_tiny_checkpoint("llama", tmp_path / "model", tokenizer="llama3")
        _edit_config(model, **({"pad_token": "<|my_pad|>"} if case == "pad_token"
                               else {"additional_special_tokens": ["<|tool|>"]}))
        expected = "1 token id(s) past the model's embedding (700 rows"
    data = tmp_path / "d.txt"
    data.write_text("Tea <|tool|> is picked in May.\n\n" * 20)
    with pytest.raises(MiniloraError, match=re.escape(expected)):
        train(TrainConfig(model=str(model), data=str(data), block_size=16, max_steps=1, output=str(tmp_path / "r"),
                          device="cpu"))
