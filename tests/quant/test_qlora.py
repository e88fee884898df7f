"""QLoRA end to end: load_model(quantize="nf4"), its memory, a training step against bitsandbytes + transformers +
peft, gradient checkpointing, the trainer's --method qlora, and merging into a 16-bit checkpoint.

The oracle is transformers' BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, compute fp32) with peft's LoRA
on top, on the CPU (bitsandbytes 0.50 runs quantize, dequantize and matmul_4bit with backward there).
"""

import json
import weakref

import pytest
import torch
from safetensors import safe_open

import minilora.formats.safetensors_folder as checkpoint
from minilora.formats.safetensors_folder import load_model, quantize_model, save_model
from minilora.lora import LoRALinear, apply_lora, merge_lora
from minilora.quant.nf4 import dequantize_nf4, quantize_nf4
from minilora.quant.nf4_linear import NF4Linear
from minilora.quant.bnb_checkpoint import block_linear_names, dequantize_model, memory_summary, model_memory
from minilora.train import main
from minilora.trainer import batch_loss_sum
from minilora.train_config import TrainConfig
from tiny_models import _quiet, load_hf_model, make_tiny_checkpoint
from tiny_tokenizers import set_chat_template

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
BLOCK_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "qkv_proj", "gate_up_proj"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    return {family: make_tiny_checkpoint(family, root / family) for family in ("llama", "qwen2", "phi3")}


def bnb_model(path):
    """transformers + bitsandbytes: NF4, double quant, fp32 compute — on the CPU."""
    import transformers
    from bitsandbytes.nn import Linear4bit

    _quiet()
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32, device_map="cpu", attn_implementation="eager")
    for m in model.modules():  # bnb's bf16 CPU inference kernel (see test_quantized_checkpoint.hf_4bit): off
        if isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


# --- loading --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, dtype", [
    ("llama", torch.float32), ("qwen2", torch.float32), ("phi3", torch.bfloat16),  # plain, q/k/v biases, fused
])
def test_block_linears_become_frozen_nf4_the_rest_stays(checkpoints, family, dtype):
    path = checkpoints[family]
    model = load_model(path, dtype=dtype, quantize="nf4")
    dense = load_model(path, dtype=dtype)
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert set(nf4) == set(block_linear_names(dense)) and {n.rsplit(".", 1)[1] for n in nf4} <= BLOCK_LINEARS
    for name, m in nf4.items():
        assert (m.weight.blocksize, m.weight.double_quant, m.compute_dtype) == (64, True, dtype)
        assert not any(p.requires_grad for p in m.parameters())
        reference = dense.get_submodule(name)
        assert torch.equal(dequantize_nf4(m.weight), dequantize_nf4(quantize_nf4(reference.weight.detach())))
        if reference.bias is not None:
            assert torch.equal(m.bias, reference.bias)
    # embeddings, norms and lm_head are not quantized: the same tensors as the dense load
    rest = {k: v for k, v in dense.state_dict().items() if k.rsplit(".", 2)[-2] not in BLOCK_LINEARS}
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in rest.items())
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))  # nothing on meta
    # quantizing while reading = quantizing the loaded model afterwards, down to the logits
    assert torch.equal(model(IDS), quantize_model(dense)(IDS))


def test_weights_are_quantized_one_tensor_at_a_time(checkpoints, monkeypatch):
    """Each 16/32-bit block weight is freed before the next one is read: never the whole model in full precision."""
    alive, calls = [], []
    real = checkpoint.quantize_nf4

    def spy(weight, *args, **kwargs):
        calls.append(sum(ref() is not None for ref in alive))  # earlier full-precision weights still in memory
        alive.append(weakref.ref(weight))
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "quantize_nf4", spy)
    model = load_model(checkpoints["llama"], quantize="nf4")
    assert len(calls) == 2 * 7 and set(calls) == {0}
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14


def test_memory_matches_the_nf4_accounting(tmp_path):
    """model_memory = Σ packed + absmax codes + nested absmax, the two code tables once, and the other weights."""
    C, inter, V, layers = 256, 512, 256, 2
    path = make_tiny_checkpoint("llama", tmp_path, hidden_size=C, intermediate_size=inter, num_hidden_layers=layers)
    model = load_model(path, quantize="nf4")
    kv = 2 * C // 4  # 2 key/value heads of head_dim C / 4
    shapes = [(C, C), (kv, C), (kv, C), (C, C), (inter, C), (inter, C), (C, inter)] * layers
    nf4 = 16 * 4 + 256 * 4  # quant_map + nested_quant_map, shared by every layer
    for out_f, in_f in shapes:
        n = out_f * in_f
        blocks = -(-n // 64)
        nf4 += (n + 1) // 2 + blocks + 4 * -(-blocks // 256)  # 4-bit codes, 8-bit absmax codes, fp32 nested absmax
    other = 4 * (2 * V * C + (2 * layers + 1) * C)  # fp32 embeddings + lm_head + norms
    mem = model_memory(model)
    n_weights = sum(o * i for o, i in shapes)
    assert mem == {"nf4": nf4, "nf4_params": n_weights, "other": other, "total": nf4 + other,
                   "bits_per_param": 8 * nf4 / n_weights}
    # QLoRA's 4 + 8/64 + 32/(64·256) = 4.127 bits; the shared code tables add 8704 bits / 1.2 M weights = 0.007
    assert mem["bits_per_param"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=0.01)
    dense = model_memory(load_model(path))["total"]
    assert dense == 4 * n_weights + other and mem["total"] < 0.3 * dense
    line = memory_summary(model)
    assert f"{mem['bits_per_param']:.3f} bits" in line and f"{n_weights:,} weights" in line


@pytest.mark.gpu
def test_quantizing_while_loading_onto_the_gpu_gives_the_same_4bit_model(checkpoints):
    """Read straight onto the GPU and quantized there: the same codes and scales as on the CPU, Triton matmuls."""
    cpu = load_model(checkpoints["qwen2"], quantize="nf4")
    gpu = load_model(checkpoints["qwen2"], quantize="nf4", device="cuda")
    for name, m in cpu.named_modules():
        if isinstance(m, NF4Linear):
            q, g = m.weight, gpu.get_submodule(name).weight
            assert g.device.type == "cuda" and q.offset == g.offset
            for field in ("packed", "absmax", "nested_absmax"):
                assert torch.equal(getattr(q, field), getattr(g, field).cpu()), (name, field)
    assert model_memory(gpu) == model_memory(cpu)
    expected = cpu(IDS)
    # Triton may multiply fp32 operands in tf32 (10-bit mantissa): ~1e-3 relative, not float32's 1e-6
    assert (gpu(IDS.cuda()).cpu() - expected).abs().max() < 1e-2 * expected.abs().max()


# --- a training step against bitsandbytes + peft --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_qlora_step_matches_bitsandbytes_transformers_peft(checkpoints, family):
    """Same weights, same NF4 bits, same LoRA A/B: the loss and every LoRA gradient agree with bnb + peft.

    Tolerance: quantization is bit-identical to bnb (asserted below: equal dequantized weights), so both sides
    compute the same function of the same numbers; only the order of float32 operations differs (matmul blocking,
    attention and loss written differently). Measured: loss 1.4e-7 relative, gradients ≤ 1.9e-6 of each
    tensor's largest entry. Allowed: 1e-5. For scale: moving one NF4 code of one layer to its neighbour shifts the
    loss by 1e-4 and the gradients by 7e-3 (measured), far outside the tolerance.
    """
    import peft
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    path = checkpoints[family]
    ours = load_model(path, quantize="nf4")
    hf = bnb_model(path)
    theirs_4bit = {n: m for n, m in hf.named_modules() if isinstance(m, Linear4bit)}
    assert theirs_4bit.keys() == {n for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    with torch._dynamo.config.patch(disable=True):
        for name, m in theirs_4bit.items():
            w = dequantize_4bit(m.weight.data, m.weight.quant_state)
            assert torch.equal(ours.get_submodule(name).dequantize(), w), name

    apply_lora(ours, r=4, alpha=8, targets="all-linear")
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    ours_lora = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in hf.named_parameters() if p.requires_grad}
    assert len(ours_lora) == len(theirs) == 2 * 7 * 2
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in ours_lora.items():
            p.normal_(0, 0.1)  # B too, so that A gets a gradient
            theirs[peft_name(name)].copy_(p)

    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding: the attention mask must reach both models
    labels = ids.masked_fill(mask == 0, -100)
    cfg = TrainConfig(model=str(path), device="cpu")
    ours.train()
    loss_sum, n = batch_loss_sum(ours, {"input_ids": ids, "attention_mask": mask, "labels": labels}, cfg,
                                 torch.device("cpu"))
    (loss_sum / n).backward()
    hf.train()
    reference = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    reference.backward()

    assert float((loss_sum / n).detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    for name, p in ours_lora.items():
        g = theirs[peft_name(name)].grad
        assert g.abs().max() > 0
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-5 * float(g.abs().max()), msg=name)
    # gradients reach A and B only: nothing else in the model requires or has one
    trained = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert trained == set(ours_lora) and all(".lora_A." in n or ".lora_B." in n for n in trained)


def peft_name(name: str) -> str:
    return "base_model.model." + name.replace(".weight", ".default.weight")


def test_gradient_checkpointing_gives_the_same_gradients(checkpoints):
    """Recomputing each block in backward (with LoRA dropout: the RNG state is replayed) changes no gradient."""
    grads = []
    for use_checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_model(checkpoints["qwen2"], quantize="nf4")
        apply_lora(model, r=4, alpha=8, dropout=0.1, targets="all-linear")
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
        model.train()
        model.gradient_checkpointing = use_checkpointing
        torch.manual_seed(1)
        model(IDS, return_hidden=True).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_bfloat16_compute_keeps_float32_lora_weights(checkpoints):
    model = load_model(checkpoints["llama"], dtype="bfloat16", quantize="nf4")
    apply_lora(model, r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    cfg = TrainConfig(model="unused", dtype="bfloat16", device="cpu")
    loss_sum, n = batch_loss_sum(model, {"input_ids": IDS, "labels": IDS}, cfg, torch.device("cpu"))
    (loss_sum / n).backward()
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert {m.base.compute_dtype for m in lora} == {torch.bfloat16}
    assert {p.dtype for m in lora for p in (m.lora_A.weight, m.lora_B.weight, m.lora_A.weight.grad)} == {torch.float32}
    assert torch.isfinite(loss_sum) and all(torch.isfinite(m.lora_A.weight.grad).all() for m in lora)


# --- the trainer ----------------------------------------------------------------------------------------------------

TEXT = ("The old mill stands by the river, and every spring the children count the boats that pass.\n\n"
        "물레방아는 강가에 서 있고 봄마다 아이들은 지나가는 배를 센다.\n\n") * 8
CHAT = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
        "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_run")
    model = make_tiny_checkpoint("llama", root / "model", tokenizer="llama3")
    set_chat_template(model, CHAT)
    (root / "base.txt").write_text(TEXT, encoding="utf-8")
    records = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(str(j) for j in range(1, i + 2))}
               for i in range(12)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return model, root


@pytest.mark.parametrize("mode", ["base", "sft"])
def test_train_cli_method_qlora(run_inputs, tmp_path, capsys, mode):
    model, root = run_inputs
    data = root / ("base.txt" if mode == "base" else "sft.jsonl")
    argv = ["--model", str(model), "--data", str(data), "--mode", mode, "--method", "qlora", "--block-size", "32",
            "--batch-size", "4", "--r", "4", "--alpha", "8", "--dropout", "0", "--lr", "5e-3", "--warmup-steps", "1",
            "--max-steps", "6", "--eval-every", "0", "--output", str(tmp_path), "--device", "cpu",
            "--grad-checkpointing", "true"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4-bit linears" in out and "bits each" in out  # the memory line
    val = [json.loads(line)["val_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "val_loss" in line]
    assert val[-1] < val[0]  # the adapters learn through the frozen 4-bit base
    adapter = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(str(adapter), "pt") as f:  # only LoRA weights, float32
        assert all(".lora_A." in k or ".lora_B." in k for k in f.keys())
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


# --- merging --------------------------------------------------------------------------------------------------------


def test_merge_lora_on_qlora_exports_a_16_bit_checkpoint(checkpoints, tmp_path):
    """Dequantize the base, add B·A in float32, round once to bf16 per weight; transformers reads the export."""
    model = load_model(checkpoints["qwen2"], dtype="bfloat16", quantize="nf4")
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    q_proj = model.model.layers[0].self_attn.q_proj
    w0 = q_proj.base.dequantize(torch.float32)  # (out, in)
    exact = w0 + q_proj.delta_weight()  # fp32
    with torch.no_grad():
        before = model(IDS)

    merge_lora(model)
    with pytest.raises(Exception, match="dequantize_model"):  # q/v merged, the other linears still 4-bit
        save_model(model, tmp_path / "mixed")
    dequantize_model(model, torch.bfloat16)
    assert not any(isinstance(m, (NF4Linear, LoRALinear)) for m in model.modules())
    merged = model.model.layers[0].self_attn.q_proj.weight
    # merge_lora rounds W0 to the compute dtype (bf16) before adding ΔW in fp32, then rounds the sum: each rounding
    # moves a value by at most half a bf16 step, 2^-8 of its magnitude.
    assert ((merged.float() - exact).abs() <= 2**-8 * (w0.abs() + exact.abs())).all()
    save_model(model, tmp_path / "merged")

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert torch.equal(f.get_tensor("model.layers.0.self_attn.q_proj.weight"), merged)
    with torch.no_grad():
        after = model(IDS)
        ours32 = model.float()(IDS)  # the merged bf16 weights, computed in fp32
        theirs = load_hf_model(tmp_path / "merged")(IDS).logits  # transformers, fp32
    assert (ours32 - theirs).abs().max() < 1e-4  # same weights, float32 on both sides (as in test_checkpoint)
    # merged vs unmerged, both computed in bf16: bf16 rounding of weights and activations, ~1% of the logit scale
    assert (after - before).abs().max() < 0.05 * before.abs().max()
