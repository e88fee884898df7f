"""The exercises' checks: each chapter ends with 2-4 exercises, and each exercise has one check here.

A check takes the learner's function and raises AssertionError (with a message that says what is wrong) unless
the function does what the exercise asks. The expected answer is never written down as a number: each check
computes it with minilora's own code (or PyTorch) on inputs it makes up, so a check tests behaviour, not a memorised
value. Solutions live in tutorials/solutions/NN_*.py; tests/test_tutorial_exercises.py checks that every solution
passes its check and that a stub (`raise NotImplementedError`) and a wrong answer (`return None`) do not.

In a chapter, `try_it(check, your_function)` runs a check and prints one line:
    [exercise] 3.2 ... correct            the function passes
    [exercise] 3.2 ... not attempted yet  the function still raises NotImplementedError
    [exercise] 3.2 ... not yet: <why>     the check failed (the message says what to look at)
so a chapter always runs to the end, whether or not its exercises are done.

Everything here is small (tensors of a few hundred numbers, or one tiny layer): the checks take milliseconds.
"""

import math

import torch
from torch import nn

EXERCISES = {}  # "3.2" -> check function; filled by @exercise


def exercise(number: str):
    """Register a check under its exercise number ("chapter.n")."""
    def register(check):
        check.number = number
        EXERCISES[number] = check
        return check
    return register


def try_it(check, function) -> bool:
    """Run `check(function)` and print the one-line verdict; True when it passes."""
    title = f"[exercise] {check.number} {function.__name__}"
    try:
        check(function)
    except NotImplementedError:
        print(f"{title} ... not attempted yet (a solution is in tutorials/solutions/)")
        return False
    except AssertionError as error:
        print(f"{title} ... not yet: {error}")
        return False
    print(f"{title} ... correct")
    return True


def _tensor(got, what: str) -> torch.Tensor:
    assert isinstance(got, torch.Tensor), f"{what} should be a torch.Tensor, got {type(got).__name__}"
    return got


def _close(got, want: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    got = _tensor(got, what)
    assert got.shape == want.shape, f"{what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert diff <= atol, f"{what} differs from the expected value by up to {diff:.3g} (tolerance {atol:g})"


def _number(got, want: float, what: str, rel: float = 1e-6) -> None:
    assert isinstance(got, (int, float)) and not isinstance(got, bool), \
        f"{what} should be a number, got {type(got).__name__}"
    assert math.isclose(got, want, rel_tol=rel, abs_tol=1e-12), f"{what} is {got}, expected {want}"


def _random_labels(generator: torch.Generator, B: int = 3, T: int = 9, V: int = 50) -> torch.Tensor:
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, 6:] = -100  # a padded row
    labels[1, :3] = -100  # a masked prompt
    return labels


# ----------------------------------------------------------------------------------------------------------
# Chapter 1: why fine-tune
# ----------------------------------------------------------------------------------------------------------
@exercise("1.1")
def check_perplexity(perplexity):
    """perplexity(mean_loss) -> float: e^loss, the number of equally likely tokens the loss is worth."""
    for loss in (0.0, 0.5, 2.3, 7.0):
        _number(perplexity(loss), math.exp(loss), f"perplexity({loss})")


@exercise("1.2")
def check_trained_share(trained_share):
    """trained_share(labels) -> float: the share of positions whose label is not -100 (what the loss counts)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        labels = _random_labels(g)
        want = (labels != -100).sum().item() / labels.numel()
        _number(trained_share(labels.tolist()), want, "trained_share(labels)")
    _number(trained_share([[-100, -100, 5]]), 1 / 3, "trained_share([[-100, -100, 5]])")


# ----------------------------------------------------------------------------------------------------------
# Chapter 2: full fine-tuning vs PEFT
# ----------------------------------------------------------------------------------------------------------
@exercise("2.1")
def check_lora_trainable(lora_trainable):
    """lora_trainable(d_in, d_out, r) -> int: the trainable parameters of one LoRALinear, predicted on paper."""
    from minilora.lora import LoRALinear

    for d_in, d_out, r in ((32, 24, 4), (64, 64, 8), (48, 16, 1), (96, 32, 16)):
        layer = LoRALinear(nn.Linear(d_in, d_out, bias=False), r=r, alpha=2 * r)
        want = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        _number(lora_trainable(d_in, d_out, r), want, f"lora_trainable({d_in}, {d_out}, {r})")


@exercise("2.2")
def check_adamw_bytes(full_ft_bytes):
    """full_ft_bytes(n_params) -> int: bytes of fp32 weights + gradients + AdamW's two moments, predicted."""
    for d_in, d_out in ((16, 8), (40, 24)):
        layer = nn.Linear(d_in, d_out)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
        layer(torch.randn(2, d_in)).sum().backward()
        optimizer.step()  # AdamW creates its state (exp_avg, exp_avg_sq) on the first step
        measured = sum(p.numel() * p.element_size() for p in layer.parameters())
        measured += sum(p.grad.numel() * p.grad.element_size() for p in layer.parameters())
        measured += sum(t.numel() * t.element_size() for state in optimizer.state.values()
                        for t in state.values() if t.dim() > 0)  # the moments; "step" is a 0-d counter
        n = sum(p.numel() for p in layer.parameters())
        _number(full_ft_bytes(n), measured, f"full_ft_bytes({n}) (measured after one AdamW step)")


@exercise("2.3")
def check_predict_trainable(predict_trainable):
    """predict_trainable(model, r, targets) -> int: LoRA's trainable count on a model, before applying it."""
    import copy

    from minilora.config import ModelConfig
    from minilora.lora import apply_lora, count_parameters
    from minilora.model import Transformer

    torch.manual_seed(0)
    config = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5))
    model = Transformer(config)
    for r, targets in ((4, ("q_proj", "v_proj")), (8, ("q_proj", "v_proj")), (2, "all-linear")):
        copy_ = copy.deepcopy(model)
        apply_lora(copy_, r=r, alpha=2 * r, targets=targets)
        want = count_parameters(copy_)[0]
        _number(predict_trainable(model, r, targets), want, f"predict_trainable(model, r={r}, {targets!r})")
    assert all(p.requires_grad for p in model.parameters()), "predict_trainable must not change the model"


# ----------------------------------------------------------------------------------------------------------
# Chapter 3: tokens, padding, -100
# ----------------------------------------------------------------------------------------------------------
@exercise("3.1")
def check_pad_batch(pad_batch):
    """pad_batch(list of id lists, pad_id) -> (input_ids, attention_mask, labels), right-padded (B, T) tensors."""
    from minilora.data import pad_collate

    rows = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    want = pad_collate([{"input_ids": r} for r in rows], pad_id=0)
    got = pad_batch(rows, 0)
    assert isinstance(got, tuple) and len(got) == 3, "return (input_ids, attention_mask, labels)"
    for name, value in zip(("input_ids", "attention_mask", "labels"), got):
        _close(value, want[name], name, atol=0)


@exercise("3.2")
def check_prompt_mask(mask_prompt):
    """mask_prompt(input_ids, prompt_len) -> labels: a copy of input_ids with -100 on the first prompt_len tokens."""
    g = torch.Generator().manual_seed(3)
    for n, prompt_len in ((8, 3), (5, 0), (6, 6)):
        ids = torch.randint(0, 100, (n,), generator=g).tolist()
        want = [-100] * prompt_len + ids[prompt_len:]
        got = mask_prompt(ids, prompt_len)
        assert isinstance(got, list) and got == want, \
            f"mask_prompt({ids}, {prompt_len}) gave {got}, expected {want} (a list)"
        assert got is not ids, "return a new list: the input ids must stay unchanged"


@exercise("3.3")
def check_masked_loss(masked_loss):
    """masked_loss(logits (B,T,V), labels (B,T)) -> scalar: the shifted next-token loss ignoring -100."""
    from minilora.loss import next_token_loss

    g = torch.Generator().manual_seed(4)
    labels = _random_labels(g)
    logits = torch.randn(*labels.shape, 50, generator=g)
    _close(masked_loss(logits, labels), next_token_loss(logits, labels)[0], "masked_loss(logits, labels)")


# ----------------------------------------------------------------------------------------------------------
# Chapter 4: LoRA
# ----------------------------------------------------------------------------------------------------------
@exercise("4.1")
def check_lora_forward(lora_forward):
    """lora_forward(x, W0, A, B, alpha, r) -> y = x·W0ᵀ + (alpha/r)·x·Aᵀ·Bᵀ, as LoRALinear computes it."""
    from minilora.lora import LoRALinear

    torch.manual_seed(5)
    layer = LoRALinear(nn.Linear(12, 10, bias=False), r=3, alpha=6)
    nn.init.normal_(layer.lora_B.weight)  # a trained-looking B (it starts at zero)
    x = torch.randn(4, 12)
    got = lora_forward(x, layer.base.weight.detach(), layer.lora_A.weight.detach(), layer.lora_B.weight.detach(),
                       6, 3)
    _close(got, layer(x).detach(), "lora_forward(...)")


@exercise("4.2")
def check_lora_init(init_lora):
    """init_lora(d_in, d_out, r) -> (A (r, d_in), B (d_out, r)): the layer starts as W0, and B still learns."""
    torch.manual_seed(6)
    d_in, d_out, r = 16, 12, 4
    got = init_lora(d_in, d_out, r)
    assert isinstance(got, tuple) and len(got) == 2, "return (A, B)"
    A, B = (_tensor(t, n).detach().clone().requires_grad_(True) for t, n in zip(got, "AB"))
    assert A.shape == (r, d_in) and B.shape == (d_out, r), f"A should be {(r, d_in)} and B {(d_out, r)}"
    assert (B == 0).all(), "B must start at zero, so that W0 + B·A = W0 at step 0"
    x, target = torch.randn(8, d_in), torch.randn(8, d_out)
    ((x @ A.T @ B.T) - target).pow(2).sum().backward()  # one step of a regression loss
    assert B.grad.abs().sum() > 0, ("B gets no gradient: its gradient is (dL/dy)ᵀ·(A·x), zero when A is zero — "
                                    "with A and B both zero, LoRA never moves")
    bound = 1 / math.sqrt(d_in)  # nn.Linear's default = Kaiming-uniform with a=√5 = U(-1/√d_in, 1/√d_in)
    assert A.abs().max() <= bound + 1e-6, f"A should be Kaiming-uniform (a=√5): values within ±1/√d_in = ±{bound:.3f}"


@exercise("4.3")
def check_merged_weight(merged_weight):
    """merged_weight(W0, A, B, alpha, r) -> W0 + (alpha/r)·B·A, the weight merge_lora writes."""
    from minilora.lora import LoRALinear, merge_lora

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(10, 6, bias=False))
    model[0] = LoRALinear(model[0], r=2, alpha=8)
    nn.init.normal_(model[0].lora_B.weight)
    W0, A, B = (t.detach().clone() for t in (model[0].base.weight, model[0].lora_A.weight, model[0].lora_B.weight))
    merge_lora(model)
    _close(merged_weight(W0, A, B, 8, 2), model[0].weight.detach(), "merged_weight(W0, A, B, 8, 2)")


# ----------------------------------------------------------------------------------------------------------
# Chapter 5: quantization
# ----------------------------------------------------------------------------------------------------------
@exercise("5.1")
def check_nf4_roundtrip(nf4_roundtrip):
    """nf4_roundtrip(x (64,)) -> x quantized to the nearest NF4 code value of x/absmax, times absmax."""
    from minilora.quant.nf4 import dequantize_nf4, quantize_nf4

    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        x = torch.randn(64, generator=g)
        want = dequantize_nf4(quantize_nf4(x.view(1, 64), blocksize=64, double_quant=False)).view(64)
        _close(nf4_roundtrip(x), want, "nf4_roundtrip(x)", atol=1e-6)


@exercise("5.2")
def check_bits_per_parameter(bits_per_parameter):
    """bits_per_parameter(double_quant) -> float: storage per weight of NF4 with 64-blocks, for a large weight."""
    from minilora.quant.nf4 import quantize_nf4

    w = torch.randn(256, 1024)  # 4096 blocks of 64, 16 groups of 256 absmax values: the per-weight limit
    for dq in (False, True):
        measured = quantize_nf4(w, blocksize=64, double_quant=dq).bits_per_parameter
        got = bits_per_parameter(dq)
        assert isinstance(got, (int, float)), "return a number"
        assert abs(got - measured) < 2e-3, f"bits_per_parameter({dq}) is {got}, measured {measured:.4f}"


# ----------------------------------------------------------------------------------------------------------
# Chapter 6: base fine-tuning
# ----------------------------------------------------------------------------------------------------------
@exercise("6.1")
def check_pack(pack):
    """pack(docs, block_size, eos_id) -> list of blocks (id lists): docs joined with EOS, cut every block_size."""
    from minilora.data import pack_into_blocks

    docs = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13, 14], [1, 15]]
    for block_size in (4, 5, 7):
        want = [b["input_ids"] for b in pack_into_blocks(docs, block_size, eos_id=2)]
        got = pack(docs, block_size, 2)
        assert isinstance(got, list) and [list(b) for b in got] == want, \
            f"pack(docs, {block_size}, 2) gave {got}, expected {want}"


@exercise("6.2")
def check_lm_labels(lm_labels):
    """lm_labels(input_ids, attention_mask) -> labels: -100 on padding only, even when pad id == EOS id."""
    eos = 2
    input_ids = torch.tensor([[1, 5, 6, eos, eos, eos], [1, 7, 8, 9, 10, eos]])  # row 0: EOS, then 2 pads (= EOS)
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    want = torch.tensor([[1, 5, 6, eos, -100, -100], [1, 7, 8, 9, 10, eos]])
    got = _tensor(lm_labels(input_ids, attention_mask), "lm_labels(...)")
    if got.shape == want.shape and got[0, 3] == -100:
        raise AssertionError("the real EOS at row 0, position 3 got -100: masking by `input_ids == pad_id` drops "
                             "EOS when pad == eos (the model then never learns to stop); use attention_mask")
    _close(got, want, "lm_labels(...)", atol=0)


# ----------------------------------------------------------------------------------------------------------
# Chapter 7: instruct fine-tuning
# ----------------------------------------------------------------------------------------------------------
@exercise("7.1")
def check_response_only(response_only):
    """response_only(prompt_ids, reply_ids) -> {"input_ids", "labels"}: the loss sees the reply only."""
    for prompt, reply in (([1, 20, 21, 22], [30, 31, 2]), ([1], [40, 2]), ([1, 9, 9], [2])):
        got = response_only(prompt, reply)
        assert isinstance(got, dict), "return a dict with input_ids and labels"
        assert list(got.get("input_ids", [])) == prompt + reply, "input_ids = prompt ids followed by reply ids"
        want = [-100] * len(prompt) + reply
        assert list(got.get("labels", [])) == want, f"labels for {prompt} + {reply} are {got.get('labels')}, " \
                                                    f"expected {want}"


@exercise("7.2")
def check_best_step(best_step):
    """best_step(history) -> the step to keep: the lowest validation loss (first one on ties)."""
    history = [(20, 2.1), (40, 1.6), (60, 1.45), (80, 1.52), (100, 1.71)]  # falls, then overfits
    _number(best_step(history), 60, "best_step(overfitting curve)")
    _number(best_step([(10, 3.0), (20, 2.0), (30, 2.0)]), 20, "best_step with a tie")
    _number(best_step([(5, 1.0)]), 5, "best_step with one evaluation")


@exercise("7.3")
def check_packed_positions(packed_row):
    """packed_row(lengths) -> (segment_ids, position_ids) of samples packed into one row without leakage."""
    from minilora.sft import pack_samples

    for lengths in ((3, 4, 2), (5,), (1, 1, 6)):
        samples = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in lengths]
        row = pack_samples(samples, max_len=sum(lengths))[0]
        got = packed_row(list(lengths))
        assert isinstance(got, tuple) and len(got) == 2, "return (segment_ids, position_ids)"
        assert list(got[0]) == row["segment_ids"], f"segment_ids for {lengths}: {got[0]} vs {row['segment_ids']}"
        assert list(got[1]) == row["position_ids"], f"position_ids for {lengths}: {got[1]} vs {row['position_ids']}"


# ----------------------------------------------------------------------------------------------------------
# Chapter 8: QLoRA
# ----------------------------------------------------------------------------------------------------------
@exercise("8.1")
def check_qlora_forward(qlora_forward):
    """qlora_forward(x, q: NF4Weight, A, B, scale) -> y of a LoRALinear around an NF4Linear."""
    from minilora.lora import LoRALinear
    from minilora.quant.nf4_linear import NF4Linear

    torch.manual_seed(9)
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(128, 32, bias=False), backend="torch"), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 128)
    got = qlora_forward(x, layer.base.weight, layer.lora_A.weight.detach(), layer.lora_B.weight.detach(),
                        layer.scale)
    _close(got, layer(x).detach(), "qlora_forward(...)", atol=1e-4)


@exercise("8.2")
def check_base_memory(base_bytes):
    """base_bytes(n_params, method) -> bytes of the frozen base: 'bf16' = 2/param, 'nf4' = NF4 with double quant."""
    from minilora.quant.nf4 import quantize_nf4

    for rows in (64, 256):
        w = torch.randn(rows, 1024)
        _number(base_bytes(w.numel(), "bf16"), w.numel() * 2, f"base_bytes({w.numel()}, 'bf16')")
        measured = quantize_nf4(w).nbytes
        got = base_bytes(w.numel(), "nf4")
        assert isinstance(got, (int, float)) and abs(got - measured) <= 0.002 * measured, \
            f"base_bytes({w.numel()}, 'nf4') is {got}, measured {measured} bytes"


# ----------------------------------------------------------------------------------------------------------
# Chapter 9: merging and exporting
# ----------------------------------------------------------------------------------------------------------
@exercise("9.1")
def check_peft_keys(peft_keys):
    """peft_keys(module_names) -> the adapter file's tensor names for LoRA on those modules (PEFT's format)."""
    from minilora.adapter import adapter_state_dict
    from minilora.lora import apply_lora

    model = nn.Module()
    model.model = nn.Module()
    model.model.q_proj, model.model.v_proj = nn.Linear(4, 4), nn.Linear(4, 4)
    names = apply_lora(model, r=2, targets=("q_proj", "v_proj"))
    got = peft_keys(names)
    assert isinstance(got, (list, set, tuple)), "return a list of key names"
    want = sorted(adapter_state_dict(model))
    assert sorted(got) == want, f"peft_keys({names}) gave {sorted(got)}, expected {want}"


@exercise("9.2")
def check_qlora_merge(qlora_merge):
    """qlora_merge(q: NF4Weight, A, B, scale) -> the dense weight whose outputs equal the trained QLoRA layer's."""
    from minilora.lora import LoRALinear
    from minilora.quant.nf4_linear import NF4Linear

    torch.manual_seed(10)
    dense = nn.Linear(128, 16, bias=False)
    layer = LoRALinear(NF4Linear.from_linear(dense, backend="torch"), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    merged = qlora_merge(layer.base.weight, layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.scale)
    merged = _tensor(merged, "qlora_merge(...)")
    x = torch.randn(5, 128)
    _close(x @ merged.T, layer(x).detach(), "x @ merged.T vs the trained QLoRA layer's output (the adapter was "
           "trained against dequantize(q), so that is the weight to merge into)", atol=1e-4)
