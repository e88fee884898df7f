"""Bad GGUF input: each case is one line of MiniloraError naming the file and the field or tensor at fault, and
the command-line tools print it without a traceback."""

import sys

import numpy as np
import pytest

pytest.importorskip("gguf")

from gguf_models import _write, hf_to_gguf  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402

from minilora.errors import MiniloraError  # noqa: E402
from minilora.formats import load_model  # noqa: E402
from minilora.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid tiny llama GGUF (Q8_0) and the checkpoint it came from."""
    root = tmp_path_factory.mktemp("good")
    hf_dir = make_tiny_checkpoint("llama", root / "hf")
    return hf_dir, hf_to_gguf(hf_dir, root / "model.gguf", qtype="Q8_0")


def _one_line(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, (part, message)


def test_wrong_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(200))
    with pytest.raises(MiniloraError) as e:
        load_model(path)
    _one_line(e, path, "not a readable GGUF file")
    with pytest.raises(MiniloraError) as e:
        load_tokenizer(path)
    _one_line(e, path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.02])
def test_truncated_file(good, tmp_path, keep):
    data = good[1].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(MiniloraError) as e:
        load_model(path)
    _one_line(e, path)
    assert "truncated" in str(e.value) or "not a readable GGUF file" in str(e.value)


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _write(writer)
    with pytest.raises(MiniloraError) as e:
        load_model(path)
    _one_line(e, path, "general.architecture 'falcon' is not supported", "llama")


def test_unsupported_tensor_type(good, tmp_path):
    path = hf_to_gguf(good[0], tmp_path / "iq.gguf", tensor_types={"blk.0.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(MiniloraError) as e:
        load_model(path)
    _one_line(e, path, "blk.0.ffn_up.weight", "IQ4_NL", "Q4_K")


@pytest.mark.parametrize("key, value, named", [
    ("llama.feed_forward_length", 96, "blk.0.ffn_"),
    ("llama.attention.head_count_kv", 4, "blk.0.attn_k.weight"),
    ("llama.block_count", 3, "blk.2"),
    ("llama.embedding_length", 32, "llama.embedding_length"),
    ("llama.vocab_size", 300, "llama.vocab_size"),
    ("llama.attention.head_count", 3, "llama.attention.head_count"),
])
def test_metadata_disagrees_with_tensor_shapes(good, tmp_path, key, value, named):
    path = hf_to_gguf(good[0], tmp_path / "bad.gguf", metadata={key: value})
    with pytest.raises(MiniloraError) as e:
        load_model(path)
    _one_line(e, path, named)


def test_missing_required_metadata(good, tmp_path):
    path = hf_to_gguf(good[0], tmp_path / "bad.gguf", metadata={"llama.block_count": None})
    with pytest.raises(MiniloraError) as e:
        load_model(path)
    _one_line(e, path, "llama.block_count", "missing")


def test_tokenizer_size_disagrees_with_embedding(good, tmp_path):
    import gguf

    path = tmp_path / "bad.gguf"
    hf_to_gguf(good[0], path)  # 256 tokens; rewrite with 255
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    path = hf_to_gguf(good[0], tmp_path / "short.gguf",
                      metadata={"tokenizer.ggml.tokens": tokens[:-1], "tokenizer.ggml.token_type": [1] * 255})
    for load in (load_model, load_tokenizer):
        with pytest.raises(MiniloraError) as e:
            load(path)
        _one_line(e, path, "tokenizer.ggml.tokens has 255 tokens", "256 rows")


def test_without_the_gguf_package(good, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(MiniloraError) as e:
        load_model(good[1])
    _one_line(e, good[1], 'pip install -e ".[gguf]"')


def test_cli_prints_one_line(good, tmp_path, capsys):
    from minilora.errors import run_cli
    from minilora.generate import main

    path = tmp_path / "model.gguf"
    path.write_bytes(b"nope")
    assert run_cli(main, ["--model", str(path), "--prompt", "hi", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and "\n" not in err
