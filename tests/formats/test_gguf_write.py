"""Writing GGUF: transformers' own GGUF loader (the oracle) reads our file back, logits, tokenizer and template.

What "equal within the type's error" means here, made exact rather than estimated: the oracle's logits are compared
(≤ 1e-4, float32 noise) with the logits of the merged model whose weights were rounded *by hand* the way the type
prescribes, and the weights read back from the file are checked against the derived per-weight bound:
    f16   |w' - w| <= max(2^-11 |w|, 2^-25)   (11 significant bits, round to nearest; below 2^-14 fp16 is
          subnormal with a fixed step of 2^-24, so the error there is at most half of it)
    bf16  |w' - w| <= 2^-8 |w|           (8 significant bits)
    q8_0  |w' - w| <= (1/2 + 127 * 2^-11) * d   per block of 32 along a row, d = max|w| / 127: half a step of
          the 8-bit grid plus the error of storing d itself in fp16 (times the largest code, 127)
1-D tensors (norms, biases) are F32 in every type and must come back exactly.
(A bound on the logits themselves would need every layer's Lipschitz constant; the tiny models here, std 0.2
weights, turn the weight error into logit errors of about 3.5 x the relative weight error x max|logit| for
f16/bf16, 10 x for q8_0 — which is why the comparison is made against the rounded weights instead.)
"""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import minilora  # noqa: E402
from minilora.errors import MiniloraError  # noqa: E402
from minilora.formats.gguf_write import permute_qk, save_gguf  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402
from tiny_tokenizers import set_chat_template  # noqa: E402

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["Hello world", "안녕하세요  여러분, 차 한 잔 🍵 어때요?", "  runs   of    spaces\n\n\tand tabs",
         "<|im_start|>user\nhi<|im_end|>", "Numbers 2024 and 3.14159", "emoji 😀👍🏽 mixed 한국어 text"]
# family -> (tiny_models family, tokenizer style, config overrides that make it writable and readable by the oracle)
CASES = {
    "llama": ("llama", "llama3", {}),  # byte-level BPE, BOS by post-processor; q/k rows permuted
    "llama_sentencepiece": ("llama", "llama", {}),  # Llama 2 style: scores, byte tokens, add_space_prefix
    "mistral": ("mistral", "llama", {"sliding_window": None}),  # written as llama (no sliding window)
    "qwen2": ("qwen2", "qwen2", {"use_sliding_window": False}),  # q/k/v biases, not permuted, no BOS
    # transformers' GGUF loader does not read qwen3's head_dim (it keeps Qwen3Config's 128), so use 128
    "qwen3": ("qwen3", "qwen2", {"head_dim": 128}),  # q/k norms, tied embeddings
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    family, style, overrides = CASES[request.param]
    path = make_tiny_checkpoint(family, tmp_path_factory.mktemp(request.param), tokenizer=style, **overrides)
    set_chat_template(path, CHATML)
    return request.param, path, minilora.load_model(path), minilora.load_tokenizer(path)


def hf_gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def rounded_like(model, gguf_type: str):
    """A copy of `model` whose matrices hold exactly what a loader reads back from a `gguf_type` file."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim == 2:
                p.copy_(round_weight(p.detach().float(), gguf_type))
    return out


def round_weight(w: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """The type's rounding, written out in torch (independent of gguf.quants)."""
    if gguf_type == "f32":
        return w
    if gguf_type == "f16":
        return w.half().float()
    if gguf_type == "bf16":
        return w.bfloat16().float()
    blocks = w.reshape(-1, 32)  # q8_0: ggml's quantize_row_q8_0_ref
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = blocks * inv
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # round half away from zero, as ggml does
    return (q * d.half().float()).reshape(w.shape)


def ids_for(model, seed=0):
    return torch.randint(3, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_transformers_reads_the_export_with_the_types_rounding(case, gguf_type, tmp_path):
    name, _, model, tokenizer = case
    path = save_gguf(model, tokenizer, tmp_path / f"{name}.{gguf_type}.gguf", gguf_type)
    ids = ids_for(model)
    with torch.no_grad():
        expected = rounded_like(model, gguf_type)(ids)
        got = hf_gguf_model(path)(ids).logits
        exact = model(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - exact).abs().max().item() > 0  # the rounding did happen (the comparison above is not vacuous)


def test_f32_export_is_exact(case, tmp_path):
    name, _, model, tokenizer = case
    path = save_gguf(model, tokenizer, tmp_path / f"{name}.f32.gguf", "f32")
    ids = ids_for(model, seed=1)
    with torch.no_grad():
        assert (hf_gguf_model(path)(ids).logits - model(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_weights_in_the_file_are_within_the_derived_bound(gguf_type, tmp_path):
    """Read the file with gguf's reader, undo the q/k permutation, compare each tensor with the model's."""
    path = make_tiny_checkpoint("llama", tmp_path / "m", tokenizer="llama3")
    model, tokenizer = minilora.load_model(path), minilora.load_tokenizer(path)
    out = save_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type)
    reader = gguf.GGUFReader(str(out))
    stored = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight", "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
             "model.layers.1.self_attn.k_proj.weight": "blk.1.attn_k.weight",
             "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
             "model.layers.1.post_attention_layernorm.weight": "blk.1.ffn_norm.weight"}
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    for hf_name, gguf_name in names.items():
        t = stored[gguf_name]
        w = state[hf_name].float()
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        for kind, n in heads.items():
            if f".{kind}." in gguf_name:  # llama.cpp's interleaved rows -> Hugging Face's halves
                D = w.shape[0] // n
                back = back.reshape(n, D // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        back = torch.from_numpy(np.array(back))  # a copy: the reader maps the file read-only
        err = (back - w).abs()
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and err.max() == 0, gguf_name
        elif gguf_type == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            assert (err <= torch.clamp(2.0**-11 * w.abs(), min=2.0**-25)).all(), gguf_name
        elif gguf_type == "bf16":
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16
            assert (err <= 2.0**-8 * w.abs()).all(), gguf_name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            d = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
            assert (err.reshape(-1, 32) <= (0.5 + 127 * 2.0**-11) * d * (1 + 1e-6)).all(), gguf_name
            assert torch.equal(back, round_weight(w, "q8_0")), gguf_name  # and it is exactly ggml's rounding


def test_permute_qk_is_llama_cpps_row_order():
    """Hand-made: one head of D=4 rows (r0 r1 | r2 r3) rotating as pairs (r0, r2), (r1, r3) -> r0 r2 r1 r3."""
    w = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads x 4 rows
    assert permute_qk(w, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_tokenizer_ids_and_chat_template_survive(case, tmp_path):
    from transformers import AutoTokenizer

    name, _, model, tokenizer = case
    path = save_gguf(model, tokenizer, tmp_path / f"{name}.gguf", "q8_0")
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert hf.encode(text) == tokenizer.encode(text), text
    messages = [{"role": "user", "content": "차 한 잔?"}, {"role": "assistant", "content": "네 🍵"}]
    assert hf.chat_template == tokenizer.chat_template == CHATML
    assert hf.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)
    fields = gguf.GGUFReader(str(path)).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.ggml.add_bos_token") == tokenizer.add_bos_token
    assert value("general.architecture") == ("qwen2" if name == "qwen2" else "qwen3" if name == "qwen3" else "llama")


def test_the_write_is_atomic_and_errors_name_the_problem(tmp_path, monkeypatch):
    path = make_tiny_checkpoint("qwen2", tmp_path / "q", tokenizer="qwen2")  # sliding window in layer 1
    model, tokenizer = minilora.load_model(path), minilora.load_tokenizer(path)
    with pytest.raises(MiniloraError, match="sliding-window"):
        save_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))
    with pytest.raises(MiniloraError, match="GGUF type must be one of"):
        save_gguf(model, tokenizer, tmp_path / "x.gguf", "q4_k")
    gemma = make_tiny_checkpoint("gemma", tmp_path / "g")
    with pytest.raises(MiniloraError, match="cannot write gemma as GGUF"):
        save_gguf(minilora.load_model(gemma), tokenizer, tmp_path / "x.gguf")

    llama = make_tiny_checkpoint("llama", tmp_path / "l", tokenizer="llama3")
    model, tokenizer = minilora.load_model(llama), minilora.load_tokenizer(llama)
    target = tmp_path / "out.gguf"
    target.write_bytes(b"old file")
    import minilora.formats.gguf_write as gw

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gw, "add_tokenizer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_gguf(model, tokenizer, target)
    assert target.read_bytes() == b"old file"  # the old file is intact, no temporary left behind
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["out.gguf"]


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "l", tokenizer="llama3")
    config = json.loads((path / "config.json").read_text())
    small = make_tiny_checkpoint("llama", tmp_path / "s", vocab_size=config["vocab_size"] - 10)
    model = minilora.load_model(small)
    with pytest.raises(MiniloraError, match="tokens but the model's embedding"):
        save_gguf(model, minilora.load_tokenizer(path), tmp_path / "x.gguf")



@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_merge_command_exports_gguf(gguf_type, tmp_path):
    """`python -m minilora.merge --format gguf`: the file holds W0 + (alpha/r)·B·A, rounded to the type."""
    from minilora.adapter import save_adapter
    from minilora.lora import apply_lora, merge_lora
    from minilora.merge import main

    path = make_tiny_checkpoint("llama", tmp_path / "base", tokenizer="llama3")
    set_chat_template(path, CHATML)
    model = minilora.load_model(path)
    apply_lora(model, r=4, alpha=8, targets="all-linear")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(model, tmp_path / "adapter")
    merged = merge_lora(model)
    assert main(["--model", str(path), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out"),
                 "--format", "gguf", "--gguf-type", gguf_type]) == 0
    out = tmp_path / "out" / f"model-{gguf_type}.gguf"
    ids = ids_for(merged)
    with torch.no_grad():
        expected = rounded_like(merged, gguf_type)(ids)
        assert (hf_gguf_model(out)(ids).logits - expected).abs().max().item() <= 1e-4
        base = minilora.load_model(path)(ids)
    assert (expected - base).abs().max().item() > 0.1  # the adapter changed the model: the merge is in the file
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.chat_template"].contents() == CHATML


def test_gguf_in_fine_tune_merge_gguf_out_round_trips(tmp_path):
    """A GGUF base (written as llama.cpp's converter writes it) -> 3 LoRA steps -> merge --format gguf -> minilora
    reads the export back with the merged model's logits: exactly for f32, within f16's rounding for f16."""
    from gguf_models import hf_to_gguf
    from minilora.adapter import load_adapter
    from minilora.lora import merge_lora
    from minilora.merge import main
    from minilora.trainer import train
    from minilora.train_config import TrainConfig

    hf = make_tiny_checkpoint("llama", tmp_path / "hf", tokenizer="llama3")
    set_chat_template(hf, CHATML)
    base = hf_to_gguf(hf, tmp_path / "base" / "tiny.gguf", qtype="F32", tokenizer=hf, chat_template=CHATML)
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(f"Line {i}: the capital of France is Paris. 하늘 차밭은 달모루섬에 있다." * 3
                             for i in range(20)), encoding="utf-8")
    result = train(TrainConfig(model=str(base), data=str(data), max_steps=3, block_size=32, batch_size=4, r=4,
                               lr=1e-2, warmup_steps=0, eval_every=0, output=str(tmp_path / "run"), log_every=1))
    assert result["val_loss"] > 0
    adapter = tmp_path / "run" / "adapter"
    merged = minilora.load_model(base)
    load_adapter(merged, adapter)
    merge_lora(merged)
    ids = ids_for(merged)
    with torch.no_grad():
        before = minilora.load_model(base)(ids)
        expected = merged(ids)
    assert (expected - before).abs().max().item() > 1e-3  # the fine-tune changed the model
    for gguf_type, reference, tol in (("f32", merged, 1e-5), ("f16", rounded_like(merged, "f16"), 1e-4)):
        out = tmp_path / f"merged-{gguf_type}.gguf"
        assert main(["--model", str(base), "--adapter", str(adapter), "--output", str(out),
                     "--format", "gguf", "--gguf-type", gguf_type]) == 0
        with torch.no_grad():
            got = minilora.load_model(out)(ids)
            assert (got - reference(ids)).abs().max().item() <= tol, gguf_type
        back = minilora.load_tokenizer(out)
        original = minilora.load_tokenizer(base)
        for text in TEXTS:
            assert back.encode(text) == original.encode(text), text
        assert back.chat_template == CHATML
        pre = [gguf.GGUFReader(str(f)).fields["tokenizer.ggml.pre"].contents() for f in (base, out)]
        assert pre[0] == pre[1]  # the base file's pre-tokenizer name is kept
