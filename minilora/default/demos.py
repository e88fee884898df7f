"""The built-in demonstrations that `python -m minilora.train` runs with no --model and no --data.

Each is a dict of TrainConfig settings (its data file included) applied on top of the user's flags: a value the
user set (anything that differs from the TrainConfig default) wins. `--mode sft` picks the instruction-tuning
demonstration. The model is the shipped tiny model (build.py rebuilds it when missing).

`--demo smollm2-sft` / `--demo smollm2-base` are the demonstrations on a real model, SmolLM2-135M-Instruct
(REAL_DEMOS below; smollm2.py finds the model, measures before and after, and runs them).
"""

from pathlib import Path

from ..train_config import TrainConfig, replace
from .build import ensure_default_model

HERE = Path(__file__).resolve().parent

# The demonstrations' settings; a value the user set on the command line (anything differing from the
# TrainConfig default) wins over these. `--mode sft` picks the instruction-tuning demonstration.
# Base fine-tuning: 54 blocks of 128 tokens, so 40 steps of 8 are ~6 epochs — past that the tiny model only
# memorises the training blocks and the validation loss turns back up.
DEMO = dict(
    mode="base", method="lora", r=16, alpha=32.0, dropout=0.1, targets="all-linear", block_size=128,
    batch_size=8, lr=2e-3, warmup_steps=10, max_steps=40, eval_every=5, save_every=20, log_every=5,
    output="runs/default", sample_prompts="Haneul Tea Garden is|하늘 차밭은", sample_tokens=32,
    data=str(HERE / "domain.txt"),
)
# Instruction tuning: questions about the tea garden whose answers always come as JSON
# {"answer": ..., "language": "en" | "ko"} (instruct_json.jsonl). The model is far too small to learn the facts
# from 108 examples, but it does learn the *format* — the point of the course's JSON example. The sample
# prompts are four training questions and four it never saw, half of each language.
SFT_DEMO = dict(
    mode="sft", method="lora", r=32, alpha=64.0, dropout=0.0, targets="all-linear", block_size=256,
    batch_size=8, lr=5e-3, warmup_steps=10, max_steps=200, eval_every=25, save_every=100, log_every=5,
    output="runs/default-sft", sample_tokens=80, data=str(HERE / "instruct_json.jsonl"),
    sample_prompts="|".join([
        "Where is Haneul Tea Garden?", "하늘 차밭은 어디에 있나요?", "Who founded Haneul Tea Garden?",
        "하늘 차밭은 몇 년에 세워졌나요?", "What is the capital of France?", "고양이는 무엇을 먹나요?",
        "How do I make green tea?", "오늘 날씨는 어때요?",
    ]),
)
DEMOS = {  # --mode → (settings, what the demonstration shows)
    "base": (DEMO, "LoRA base fine-tuning of a tiny bilingual model on an invented tea-garden corpus"),
    "sft": (SFT_DEMO, "LoRA instruction tuning of a tiny bilingual model to answer in JSON"),
}

# The real-model demonstrations (smollm2.py): settings on top of the user's flags as above, plus the held-out
# questions measured before and after. Both must run in <= 5 minutes on 2 CPU cores.
# SFT: 70 questions answered as {"answer": ..., "language": ...} (50 English, 20 Korean; general facts none of
# the 12 held-out questions repeats). lr 1e-3 taught the format but damaged facts in an earlier run ("6 x 7" ->
# "18"); at lr 5e-4 and 20 steps 6 x 7 stays 42 and 7 of the 8 held-out facts the model knew survive, while
# 11 of 12 replies become well-formed JSON (measured 2026-12-01: README). Replies get 64 tokens: Korean costs
# SmolLM2 several tokens a syllable, and with 32 three Korean replies were cut before the object closed.
SMOLLM2_SFT = dict(
    mode="sft", method="lora", r=8, alpha=16.0, dropout=0.0, targets="all-linear", block_size=128,
    batch_size=8, lr=5e-4, warmup_steps=3, max_steps=20, eval_every=0, save_every=0, log_every=2,
    val_fraction=0.1, output="runs/smollm2-sft", sample_tokens=64, sample_prompts="",
    data=str(HERE / "smollm2_json.jsonl"),
)
# Base fine-tuning on the English paragraphs of domain.txt (smollm2.english_paragraphs: 3.2 k tokens, 25 blocks
# of 128), then 12 cloze prompts about facts the text states in other words.
SMOLLM2_BASE = dict(
    mode="base", method="lora", r=16, alpha=32.0, dropout=0.0, targets="all-linear", block_size=128,
    batch_size=4, lr=2e-3, warmup_steps=3, max_steps=30, eval_every=0, save_every=0, log_every=3,
    val_fraction=0.1, output="runs/smollm2-base", sample_tokens=12, sample_prompts="",
)
REAL_DEMOS = {  # --demo → (settings, held-out questions and what the demonstration shows)
    "smollm2-sft": (SMOLLM2_SFT, {"questions": "smollm2_json_eval.jsonl",
                                  "what": "LoRA instruction tuning of SmolLM2-135M-Instruct to answer in JSON"}),
    "smollm2-base": (SMOLLM2_BASE, {"questions": "domain_questions.jsonl",
                                    "what": "LoRA base fine-tuning of SmolLM2-135M-Instruct on the tea-garden text"}),
}


def demo_output(mode: str, method: str) -> str:
    """Each demonstration's own run folder, so one never overwrites another's results: runs/default (LoRA base
    fine-tuning), runs/default-sft, runs/default-qlora, runs/default-sft-qlora, runs/default-full, ..."""
    return "runs/default" + ("-sft" if mode == "sft" else "") + ("" if method == "lora" else f"-{method}")


def default_run_config(cfg: TrainConfig) -> TrainConfig:
    """The user's config with the demonstration's model, data and settings filled in (by `cfg.mode`)."""
    demo, what = DEMOS[cfg.mode]
    defaults = TrainConfig()
    changes = {name: value for name, value in demo.items() if getattr(cfg, name) == getattr(defaults, name)}
    if "output" in changes:
        changes["output"] = demo_output(cfg.mode, cfg.method)
    print(f"no --model/--data given: running the built-in demonstration ({what})")
    return replace(cfg, model=str(ensure_default_model()), **changes)
