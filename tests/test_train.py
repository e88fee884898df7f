"""The training loop: parity with peft + transformers + torch AdamW, resume = no interruption, Ctrl-C, CLI errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilora.errors import MiniloraError
from minilora.train import train
from minilora.trainer import lr_factor
from minilora.train_config import TrainConfig, parse_args
from tiny_models import load_hf_model, make_tiny_training_inputs

TEXT = (
    "The river runs past the old mill and the children count the boats.\n\n"
    "강물은 오래된 방앗간 옆을 흐르고 아이들은 배를 센다.\n\n"
    "In spring the orchard turns white, and bees visit every tree.\n\n"
    "봄이 되면 과수원이 하얗게 변하고 벌들이 나무마다 찾아온다.\n\n"
) * 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with a byte-level tokenizer, and a small bilingual text file."""
    return make_tiny_training_inputs(tmp_path_factory.mktemp("train"), "data.txt", TEXT)


def config(tiny, out, **changes) -> TrainConfig:
    model, data = tiny
    base = dict(model=str(model), data=str(data), block_size=32, batch_size=4, r=4, alpha=8, dropout=0.1,
                lr=1e-3, warmup_steps=2, max_steps=6, eval_every=3, output=str(out), seed=3, device="cpu")
    return TrainConfig(**{**base, **changes})


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_lora_run_writes_outputs_and_learns(tiny, tmp_path):
    final = train(config(tiny, tmp_path, max_steps=12, lr=5e-3, dropout=0.0))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < val[0] - 0.1  # the validation loss visibly falls on this repetitive text
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "loss.svg", "config.toml",
                 "checkpoints/latest", "checkpoints/step-000012/trainer_state.pt"):
        assert (tmp_path / name).is_file(), name
    assert "<polyline" in (tmp_path / "loss.svg").read_text()


def test_resume_reproduces_the_uninterrupted_run(tiny, tmp_path):
    """Stop at step 3 (checkpoint), resume in a fresh process state: steps 4-6 have the same losses."""
    full = tmp_path / "full"
    train(config(tiny, full, save_every=3))
    resumed = tmp_path / "resumed"
    # A fresh run folder resuming from the first run's step-3 checkpoint: model, optimizer, scheduler, RNG
    # (dropout masks) and data position all come from the checkpoint.
    torch.manual_seed(12345)  # a different global RNG state must not matter
    train(config(tiny, resumed, resume=str(full / "checkpoints" / "step-000003")))
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step


def test_resume_latest_in_the_same_folder(tiny, tmp_path):
    full = tmp_path / "full"
    train(config(tiny, full, max_steps=4, save_every=2))
    again = tmp_path / "again"
    train(config(tiny, again, max_steps=2, save_every=2))  # an "interrupted" run: same config but stopped at 2
    # continue it to 4 steps: the schedule depends on max_steps, so resume with the full run's max_steps
    train(config(tiny, again, max_steps=4, save_every=2, resume="latest"))
    assert losses(again)[3] == pytest.approx(losses(full)[3], abs=1e-6)
    assert losses(again)[4] == pytest.approx(losses(full)[4], abs=1e-6)


def test_ctrl_c_saves_a_checkpoint(tiny, tmp_path, monkeypatch):
    import minilora.trainer as train_module

    real_step, calls = train_module.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny, tmp_path))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert (tmp_path / "checkpoints" / "step-000002" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))  # no half-written checkpoint left behind


def test_full_finetuning_saves_a_checkpoint_transformers_loads(tiny, tmp_path):
    train(config(tiny, tmp_path, method="full", max_steps=2, lr=1e-4))
    hf = load_hf_model(tmp_path / "model")
    from minilora.formats.safetensors_folder import load_model

    ours = load_model(tmp_path / "model")
    ids = torch.tensor([[1, 5, 9, 30, 44, 2]])
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_loss_equals_transformers_loss(tiny):
    """Our chunked loss on a padded batch = transformers' model(..., labels=...).loss (mean over tokens)."""
    from minilora.formats.safetensors_folder import load_model
    from minilora.loss import chunked_next_token_loss

    model_dir, _ = tiny
    ours, hf = load_model(model_dir), load_hf_model(model_dir)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss_sum, n = chunked_next_token_loss(ours(ids, attention_mask=mask, return_hidden=True),
                                          ours.lm_head_weight, labels, chunk_size=5)
    reference = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert float((loss_sum / n).detach()) == pytest.approx(float(reference), abs=1e-5)


def test_one_step_matches_peft_transformers_adamw(tiny):
    """Same LoRA weights in, same batch: one optimiser step of ours = peft + transformers + torch AdamW (1e-5)."""
    import peft

    from minilora.formats.safetensors_folder import load_model
    from minilora.lora import apply_lora
    from minilora.trainer import make_optimizer, train_step

    model_dir, _ = tiny
    cfg = TrainConfig(model=str(model_dir), r=4, alpha=8, dropout=0.0, lr=1e-2, warmup_steps=0,
                      weight_decay=0.01, max_grad_norm=0.0, targets="q_proj,v_proj,down_proj")
    ours = load_model(model_dir)
    apply_lora(ours, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    hf = peft.get_peft_model(load_hf_model(model_dir), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    ours_lora = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in hf.named_parameters() if p.requires_grad}
    assert len(ours_lora) == len(theirs) == 2 * 2 * 3
    with torch.no_grad():
        for name, p in ours_lora.items():
            p.normal_(0, 0.1)  # B too, so both A and B get non-trivial gradients
            theirs["base_model.model." + name.replace(".weight", ".default.weight")].copy_(p)

    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    optimizer = make_optimizer(ours, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, 10))
    train_step(ours, optimizer, scheduler, [batch], cfg, torch.device("cpu"))

    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    hf.train()
    hf(input_ids=ids, labels=ids).loss.backward()
    hf_opt.step()
    for name, p in ours_lora.items():
        ref = theirs["base_model.model." + name.replace(".weight", ".default.weight")]
        torch.testing.assert_close(p, ref, atol=1e-5, rtol=0)
        assert not torch.allclose(p, ref + 1e-3)  # the step moved the weights (the check can fail)


def test_gradient_accumulation_equals_one_big_batch(tiny):
    """Two micro-batches of unequal token counts, normalised by the step's total = one batch of both."""
    from minilora.formats.safetensors_folder import load_model
    from minilora.lora import apply_lora
    from minilora.trainer import make_optimizer, train_step

    model_dir, _ = tiny
    cfg = TrainConfig(model=str(model_dir), lr=1e-2, warmup_steps=0, max_grad_norm=1.0)
    ids = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, 7:] = -100  # unequal counted tokens per row
    mask = torch.ones_like(ids)
    results = []
    for micro in ([slice(0, 3)], [slice(0, 1), slice(1, 3)]):
        torch.manual_seed(0)
        model = load_model(model_dir)
        apply_lora(model, r=4, alpha=8, targets="all-linear")
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        optimizer = make_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        batches = [{"input_ids": ids[s], "labels": labels[s], "attention_mask": mask[s]} for s in micro]
        stats = train_step(model, optimizer, scheduler, batches, cfg, torch.device("cpu"))
        results.append((stats["loss"], [p.detach().clone() for p in model.parameters() if p.requires_grad]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_step(tiny, tmp_path):
    a = train(config(tiny, tmp_path / "a", max_steps=2, dropout=0.0))
    b = train(config(tiny, tmp_path / "b", max_steps=2, dropout=0.0, grad_checkpointing=True))
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


def test_bfloat16_autocast_runs_and_learns(tiny, tmp_path):
    final = train(config(tiny, tmp_path, dtype="bfloat16", max_steps=6, lr=5e-3, dropout=0.0))
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    assert final["val_loss"] < first


def test_toml_config_and_flags(tiny, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('r = 2\nlr = 0.5\nblock-size = 16\ntargets = "q_proj"\n')
    cfg = parse_args(["--config", str(toml), "--lr", "0.001"])
    assert (cfg.r, cfg.lr, cfg.block_size, cfg.targets) == (2, 0.001, 16, "q_proj")
    toml.write_text("rank = 2\n")
    with pytest.raises(MiniloraError, match="unknown option.*rank"):
        parse_args(["--config", str(toml)])


@pytest.mark.parametrize("change, message", [
    (dict(data="missing.txt"), "missing.txt"),
    (dict(block_size=100_000), "block-size 100000 is longer than the model's context"),
    (dict(text_field="body", data="records.jsonl"), "body"),
    (dict(data="empty.txt"), "empty"),
    (dict(method="qlora", r=0), "--r must be at least 1"),
])
def test_cli_mistakes_are_one_line_errors(tiny, tmp_path, change, message):
    model, data = tiny
    (tmp_path / "records.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    args = {"model": str(model), "data": str(data), "output": str(tmp_path / "out"), "max-steps": "1", **change}
    argv = []
    for key, value in args.items():
        value = str(tmp_path / value) if key == "data" and not Path(str(value)).is_absolute() else value
        argv += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run([sys.executable, "-m", "minilora.train", *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr


def test_default_demonstration_runs(tmp_path):
    """`python -m minilora.train` with no model/data builds the default model and fine-tunes it (shortened)."""
    env = {**__import__("os").environ, "MINILORA_HOME": str(tmp_path / "home"),
           "MINILORA_DEFAULT_PRETRAIN_STEPS": "3"}
    result = subprocess.run([sys.executable, "-m", "minilora.train", "--max-steps", "4", "--output",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainable params" in result.stdout and "before fine-tuning" in result.stdout
    assert "after fine-tuning" in result.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_epochs_set_the_number_of_steps(tiny, tmp_path):
    """--epochs E with no --max-steps: E × (batches per epoch / grad_accum) optimiser steps."""
    from minilora.data import load_base_data
    from minilora.tokenizer import load_tokenizer

    model, data = tiny
    blocks, _ = load_base_data(data, load_tokenizer(model), 32, val_fraction=0.1, seed=3)
    train(config(tiny, tmp_path, max_steps=None, epochs=2, batch_size=2, grad_accum=2, eval_every=0))
    expected = 2 * ((len(blocks) // 2) // 2)
    assert max(losses(tmp_path)) == expected and expected >= 4


def test_fused_adamw_when_every_parameter_is_on_one_cpu_or_cuda_device_and_it_steps_like_foreach(tiny):
    from types import SimpleNamespace

    from minilora.formats.safetensors_folder import load_model
    from minilora.trainer import make_optimizer, use_fused_adamw

    cuda, cpu = SimpleNamespace(device=torch.device("cuda", 0)), SimpleNamespace(device=torch.device("cpu"))
    meta = SimpleNamespace(device=torch.device("meta"))
    assert use_fused_adamw([cuda, cuda]) and use_fused_adamw([cpu, cpu])
    assert not use_fused_adamw([cuda, cpu]) and not use_fused_adamw([meta]) and not use_fused_adamw([])
    model_dir, _ = tiny
    models = [load_model(model_dir).requires_grad_(True) for _ in range(2)]
    cfg = TrainConfig(model=str(model_dir), weight_decay=0.1)
    fused = make_optimizer(models[0], cfg)
    assert fused.defaults["fused"]
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in make_optimizer(models[1], cfg).param_groups]
    foreach = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    for step in range(3):  # the same gradients on both copies; the updates agree to float32 rounding
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.full_like(a, 0.01 * (step + 1)).add_(a.detach())
            b.grad = a.grad.clone()
        fused.step()
        foreach.step()
    start = next(load_model(model_dir).parameters())
    assert (next(models[0].parameters()) - start).abs().max() > 1e-4  # it did step (3 steps of lr 2e-4)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_train_step_syncs_with_the_host_a_fixed_number_of_times(tiny):
    """.item() / int() / float() on a tensor run aten._local_scalar_dense (on a GPU: wait for all queued work).
    Their number per step does not grow with the micro-batches (the loss is summed on the device); the CPU's
    AdamW reads its step counters this way too, which is why the count is compared, not hard-coded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from minilora.formats.safetensors_folder import load_model
    from minilora.lora import apply_lora
    from minilora.trainer import make_optimizer, train_step

    class HostSyncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    model_dir, _ = tiny
    cfg = TrainConfig(model=str(model_dir), lr=1e-2, warmup_steps=0, max_grad_norm=1.0)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(2))
    counts = []
    for n_micro in (1, 4):
        model = load_model(model_dir)
        apply_lora(model, r=4, alpha=8)
        optimizer = make_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        batches = [{"input_ids": ids, "labels": ids.clone()} for _ in range(n_micro)]
        with HostSyncs() as syncs:
            stats = train_step(model, optimizer, scheduler, batches, cfg, torch.device("cpu"))
        assert stats["tokens"] == 18 * n_micro and math.isfinite(stats["loss"])
        counts.append(syncs.n)
    assert counts[0] == counts[1]


def test_evaluate_syncs_with_the_host_once_however_many_batches(tiny):
    """The validation loss is summed on the device and read once at the end (not one GPU wait per batch); it is
    the token-weighted mean of the batches' cross-entropy, computed here from the logits with torch's own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from minilora.formats.safetensors_folder import load_model
    from minilora.trainer import evaluate

    class HostSyncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    class ValBatches:  # what evaluate reads: epoch(0), an iterable of batches
        def __init__(self, batches):
            self.batches = batches

        def epoch(self, _):
            return iter(self.batches)

    model_dir, _ = tiny
    model = load_model(model_dir)
    cfg = TrainConfig(model=str(model_dir))
    gen = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(4):
        ids = torch.randint(3, 200, (2, 9), generator=gen)
        labels = ids.clone()
        labels[0, :3] = -100  # a different number of counted tokens per batch: the mean must weight them
        batches.append({"input_ids": ids, "labels": labels})
    counts, results = [], []
    for n in (1, 4):
        with HostSyncs() as syncs:
            results.append(evaluate(model, ValBatches(batches[:n]), cfg, torch.device("cpu")))
        counts.append(syncs.n)
    assert counts[0] == counts[1] <= 2
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(b["input_ids"])[:, :-1].flatten(0, 1),
                                                    b["labels"][:, 1:].flatten(), reduction="sum") for b in batches]
    assert results[1]["val_tokens"] == 4 * (8 + 6)  # row 0: targets 1 and 2 are -100
    assert results[1]["val_loss"] == pytest.approx(float(sum(losses)) / (4 * 14), rel=1e-5)


def test_threads_flag_and_nothing_else_caps_torch_threads():
    assert parse_args(["--threads", "3"]).threads == 3 and parse_args([]).threads is None
    with pytest.raises(MiniloraError, match="--threads"):
        TrainConfig(threads=0)
    root = Path(__file__).resolve().parents[1]
    callers = [p.relative_to(root).as_posix() for folder in ("minilora", "tutorials")
               for p in sorted((root / folder).rglob("*.py")) if "set_num_threads(" in p.read_text(encoding="utf-8")]
    assert callers == ["minilora/trainer.py"]  # applying --threads, only when set
    assert "if cfg.threads:" in (root / "minilora" / "trainer.py").read_text(encoding="utf-8")
