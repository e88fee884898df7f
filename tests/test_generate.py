"""Generation: sampling filters against transformers' warpers, seeded sampling, eos handling, streaming, the CLI.

Greedy decoding against transformers' generate for every family is in test_model.py.
"""

import io
import subprocess
import sys

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from minilora.formats.safetensors_folder import load_model
from minilora.errors import MiniloraError, run_cli
from minilora.generate import main
from minilora.generation import TextStreamer, generate, sample_next_token, top_k_filter, top_p_filter
from minilora.tokenizer import load_tokenizer
from tiny_models import PAD, load_hf_model, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama with a byte-level tokenizer: (folder, minilora model, transformers model)."""
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), tokenizer="llama3")
    return path, load_model(path), load_hf_model(path)


@pytest.mark.parametrize("k", [1, 3, 50, 1000])
def test_top_k_filter_matches_transformers(k):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(k))
    expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, k), expected)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999])
@pytest.mark.parametrize("V", [5, 50, 1000])
def test_top_p_filter_matches_transformers(p, V):
    logits = 3 * torch.randn(8, V, generator=torch.Generator().manual_seed(V))
    expected = TopPLogitsWarper(top_p=p)(None, logits.clone())
    got = top_p_filter(logits, p)
    assert torch.equal(got.isinf(), expected.isinf())
    assert torch.equal(got[~got.isinf()], logits[~got.isinf()])


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: (~top_p_filter(logits, p).isinf()).sum().item()
    assert [kept(p) for p in (0.4, 0.7, 0.85, 0.9, 0.96, 1.0)] == [1, 2, 3, 3, 4, 4]


def test_sampling_follows_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]]).expand(40_000, 5)
    g = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 2.0):
        tokens = sample_next_token(logits, temperature=temperature, generator=g)
        freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
        expected = (logits[0] / temperature).softmax(-1)
        assert (freq - expected).abs().max() < 0.01  # 3 standard errors at n = 40k is < 0.008
    tokens = sample_next_token(logits, temperature=1.0, top_k=2, generator=g)
    assert set(tokens.tolist()) == {0, 1}
    tokens = sample_next_token(logits, temperature=1.0, top_p=0.9, generator=g)  # p = .64 .24 .09 .03 ...
    assert set(tokens.tolist()) == {0, 1, 2}


def test_seeded_sampling_is_reproducible_and_degenerate_filters_are_greedy(tiny):
    _, model, _ = tiny
    ids = torch.tensor([[5, 6, 7, 8]])
    run = lambda seed, **kw: generate(model, ids, 15, temperature=1.0, eos_token_ids=[],
                                      generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    greedy = generate(model, ids, 15, eos_token_ids=[])
    assert torch.equal(run(0, top_k=1), greedy)
    assert torch.equal(run(3, top_p=1e-6), greedy)


def test_eos_stops_a_row_and_pads_it_like_transformers(tiny):
    """eos = the token row 0 greedily emits at step 5: row 0 stops there, row 1 goes on, padded output matches."""
    _, model, hf = tiny
    ids = torch.randint(5, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    free = generate(model, ids, 12, eos_token_ids=[])
    eos = int(free[0, 7 + 5])
    assert eos not in free[0, 7:7 + 5].tolist() and eos not in free[1, 7:].tolist()
    got = generate(model, ids, 12, eos_token_ids=[eos, 10**6], pad_token_id=PAD)
    assert got[0, 7 + 5] == eos and (got[0, 7 + 6:] == PAD).all()
    assert torch.equal(got[1], free[1])
    config = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=[eos], pad_token_id=PAD)
    assert got.tolist() == hf.generate(ids, generation_config=config).tolist()
    # a single row stops early: the output is shorter than max_new_tokens
    assert generate(model, ids[:1], 12, eos_token_ids=eos).shape == (1, 7 + 6)


def test_default_eos_comes_from_the_model_config(tiny):
    _, model, _ = tiny
    ids = torch.tensor([[5, 6, 7]])
    forced = generate(model, ids, 3, eos_token_ids=[])
    model.config.eos_token_id, saved = int(forced[0, 3]), model.config.eos_token_id
    try:
        assert generate(model, ids, 3).shape == (1, 4)
    finally:
        model.config.eos_token_id = saved


def test_stream_sees_every_new_token_in_order(tiny):
    _, model, _ = tiny
    seen = []
    out = generate(model, [5, 6, 7], 9, eos_token_ids=[], stream=lambda t: seen.append(int(t[0])))
    assert seen == out[0, 3:].tolist() and len(seen) == 9
    assert torch.equal(generate(model, [5, 6, 7], 0), torch.tensor([[5, 6, 7]]))


def test_text_streamer_waits_for_complete_characters():
    class Bytes:  # a tokenizer whose tokens are single UTF-8 bytes
        def decode(self, ids, skip_special_tokens=False):
            return bytes(ids).decode("utf-8", errors="replace")

    out = io.StringIO()
    streamer = TextStreamer(Bytes(), out)
    printed = []
    for b in "a東é!".encode():
        streamer(torch.tensor([b]))
        printed.append(out.getvalue())
    assert printed == ["a", "a", "a", "a東", "a東", "a東é", "a東é!"]
    streamer.end()
    assert out.getvalue() == "a東é!\n"


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_arguments(tiny, kwargs, message):
    _, model, _ = tiny
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(MiniloraError, match=message):
        generate(model, [5, 6], **kwargs)


def test_cli_streams_the_greedy_continuation(tiny, capsys):
    path, model, _ = tiny
    prompt = "The capital of France is"
    assert run_cli(main, ["--model", str(path), "--prompt", prompt, "--max-new-tokens", "12", "--device", "cpu"]) == 0
    tok = load_tokenizer(path)
    ids = tok.encode(prompt)
    out = generate(model, ids, 12, eos_token_ids=tok.eos_token_ids)
    expected = prompt + tok.decode(out[0, len(ids):], skip_special_tokens=True) + "\n"
    assert capsys.readouterr().out == expected


def test_cli_sampling_flags_are_seeded(tiny, capsys):
    path, _, _ = tiny
    args = ["--model", str(path), "--prompt", "Tea", "--max-new-tokens", "10", "--temperature", "1.5",
            "--top-k", "50", "--top-p", "0.95", "--device", "cpu"]
    outputs = []
    for seed in ("1", "1", "2"):
        assert run_cli(main, args + ["--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_cli_adapter_flag_applies_a_peft_adapter(tiny, tmp_path, capsys):
    from minilora.adapter import save_adapter
    from minilora.lora import apply_lora

    path, _, _ = tiny
    model = load_model(path)
    apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a trained-looking adapter (B = 0 at init would change nothing)
    save_adapter(model, tmp_path / "adapter")
    prompt = "Tea is"
    assert run_cli(main, ["--model", str(path), "--prompt", prompt, "--max-new-tokens", "10", "--device", "cpu",
                          "--adapter", str(tmp_path / "adapter")]) == 0
    tok = load_tokenizer(path)
    ids = tok.encode(prompt)
    with_adapter = generate(model, ids, 10, eos_token_ids=tok.eos_token_ids)
    assert capsys.readouterr().out == prompt + tok.decode(with_adapter[0, len(ids):], skip_special_tokens=True) + "\n"
    assert not torch.equal(with_adapter, generate(load_model(path), ids, 10, eos_token_ids=tok.eos_token_ids))


def test_cli_bad_path_is_one_line_and_nonzero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minilora.generate", "--model", str(tmp_path / "missing"),
                             "--prompt", "hi"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "missing" in result.stderr
