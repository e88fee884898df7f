"""GGUF tokenizers (formats/gguf_tokenizer.py) against transformers' GGUF tokenizer on the same file, and, where the
GGUF keeps everything the original had, against the original tokenizer.json (read by transformers too).

The files are tests/tiny_tokenizers.py's tokenizers stored the way llama.cpp stores them (tests/gguf_models.py):
byte-level BPE as model "gpt2" with merges and a pre-tokenizer name, SentencePiece-style BPE as model "llama"
with scores and (or without) merges, under the llama, gemma and phi3 architectures.
"""

import pytest

pytest.importorskip("gguf")

from gguf_models import tokenizer_to_gguf  # noqa: E402
from tiny_tokenizers import build_byte_level_bpe, build_metaspace_bpe  # noqa: E402

from minilora.tokenizer import load_tokenizer  # noqa: E402

TEXTS = [
    "Hello world, this is a test.",
    "오늘 날씨가 좋아서 공원에 산책을 갔습니다. 한국어 토큰화!",
    "emoji 😀🎉👍🏽 and flags 🇰🇷🇺🇸",
    "runs   of    spaces\n\n\t\ttabs   and trailing  ",
    "  leading spaces",
    "don't I'll we've 12345 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<s>[INST] x [/INST]</s><|eot_id|>",
    "x<|im_end|>y<unk>z",
    "",
    "ÀÉÎõü ñ ß ﬁ — «»",
]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WITH_BOS = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
            "' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "안녕? 6 x 7 = ?"},
            {"role": "assistant", "content": "42 😀"}, {"role": "user", "content": "  and   then?"}]


def _oracle(path):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _check_same(ours, ref, texts=TEXTS):
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert len(ours) == len(ref)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.token_to_id(ours.unk_token) == ref.unk_token_id


CASES = {  # name -> (builder, style, GGUF architecture, store merges for SentencePiece, chat template)
    "byte_level_llama3": (build_byte_level_bpe, "llama3", "llama", True, WITH_BOS),
    "byte_level_qwen2": (build_byte_level_bpe, "qwen2", "qwen2", True, CHATML),
    "sentencepiece_merges": (build_metaspace_bpe, "llama", "llama", True, WITH_BOS),
    "sentencepiece_scores_only": (build_metaspace_bpe, "llama", "llama", False, WITH_BOS),
    "gemma": (build_metaspace_bpe, "gemma", "gemma2", False, WITH_BOS),
    "phi3": (build_metaspace_bpe, "llama", "phi3", False, CHATML),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_decode_and_template_equal_transformers(case, tmp_path):
    build, style, arch, merges, template = CASES[case]
    folder = build(tmp_path / "hf", style=style)
    path = tokenizer_to_gguf(folder, tmp_path / "gguf" / "tok.gguf", arch=arch, chat_template=template,
                             merges=merges)
    ours, ref = load_tokenizer(path), _oracle(path)
    _check_same(ours, ref)
    assert ours.add_bos_token == (ref("a")["input_ids"][:1] == [ref.bos_token_id])
    for generation_prompt in (False, True):
        text = ours.render_chat(MESSAGES, add_generation_prompt=generation_prompt)
        assert text == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt) == \
            ref.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=generation_prompt,
                                    return_dict=False)


@pytest.mark.parametrize("case", ["byte_level_llama3", "sentencepiece_merges"])
def test_ids_equal_the_original_tokenizer(case, tmp_path):
    """Nothing of these two is lost on the way into GGUF: the original tokenizer.json gives the same ids."""
    from transformers import AutoTokenizer

    build, style, arch, merges, template = CASES[case]
    folder = build(tmp_path / "hf", style=style)
    path = tokenizer_to_gguf(folder, tmp_path / "gguf" / "tok.gguf", arch=arch, merges=merges)
    ours, original = load_tokenizer(path), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert ours.encode(text) == original(text)["input_ids"], text


def test_flags_and_stop_tokens(tmp_path):
    import gguf

    folder = build_byte_level_bpe(tmp_path / "hf", style="llama3")
    path = tokenizer_to_gguf(folder, tmp_path / "a" / "tok.gguf")
    ours = load_tokenizer(path)
    assert ours.add_bos_token and ours.encode("hi")[0] == ours.bos_token_id  # llama3 style: BOS by the flag
    # add_eos_token and eot_token_id written by hand: EOS appended, both ids stop generation
    from gguf_models import _write, add_tokenizer

    (tmp_path / "b").mkdir()
    writer = gguf.GGUFWriter(str(tmp_path / "b" / "tok.gguf"), "llama")
    add_tokenizer(writer, folder)
    writer.add_add_eos_token(True)
    writer.add_eot_token_id(ours.token_to_id("<|end_of_text|>"))
    _write(writer)
    flagged, ref = load_tokenizer(tmp_path / "b"), _oracle(tmp_path / "b" / "tok.gguf")
    assert flagged.encode("hi") == ref("hi")["input_ids"] and flagged.encode("hi")[-1] == flagged.eos_token_id
    assert flagged.eos_token_ids == [flagged.eos_token_id, flagged.token_to_id("<|end_of_text|>")]


@pytest.mark.parametrize("case", ["byte_level_qwen2", "sentencepiece_scores_only", "gemma"])
def test_written_tokenizer_folder_reads_back_the_same(case, tmp_path):
    """write_tokenizer_files: the folder a safetensors export of a GGUF model gets; minilora and transformers
    read it to the GGUF tokenizer's ids, special tokens and template."""
    from transformers import AutoTokenizer

    from minilora.formats.gguf_tokenizer import write_tokenizer_files

    build, style, arch, merges, template = CASES[case]
    path = tokenizer_to_gguf(build(tmp_path / "hf", style=style), tmp_path / "gguf" / "tok.gguf", arch=arch,
                             chat_template=template, merges=merges)
    ours = load_tokenizer(path)
    names = write_tokenizer_files(ours, tmp_path / "out")
    assert names[:2] == ["tokenizer.json", "tokenizer_config.json"]
    again, ref = load_tokenizer(tmp_path / "out"), AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text) == ref(text)["input_ids"], text
    assert (again.bos_token, again.eos_token, again.eos_token_ids) == (ours.bos_token, ours.eos_token,
                                                                       ours.eos_token_ids)
    assert again.render_chat(MESSAGES, add_generation_prompt=True) == \
        ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
