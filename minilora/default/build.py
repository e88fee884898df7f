"""The built-in demonstration: a tiny bilingual model built here, then LoRA-tuned on a domain it never saw.

`python -m minilora.train` with no arguments must run on a fresh machine with no download, so minilora makes
its own small "pre-trained" model, deterministically, from text it ships:

1. train a byte-level BPE tokenizer (2,048 tokens) on the shipped Korean + English text (`tokenizers`);
2. write a randomly initialised Llama-architecture checkpoint (4 layers, hidden 128: about 1 M parameters)
   in the Hugging Face format — the same format a real checkpoint from the hub has;
3. pre-train it with minilora's own trainer (full fine-tuning) on `general.txt`, everyday prose that never
   mentions the demo's domain.

The result is shipped in `minilora/default/model/` (4 MB), made by `python -m minilora.default.build` with this
recipe, so the demonstration starts at once. If that folder is missing (or MINILORA_DEFAULT_REBUILD=1), the
model is built on first use and cached in ~/.cache/minilora (or $MINILORA_HOME) — with
MINILORA_DEFAULT_PRETRAIN_STEPS steps, which tests set low.

The demonstration then fine-tunes that model with LoRA on `domain.txt` — facts about an invented tea garden —
so the validation loss on held-out domain text falls visibly (7.9 → 6.0) and the samples pick up the domain's
words — a model this small learns vocabulary and phrasing from 54 blocks of text, not facts.
`python -m minilora.train --mode sft` runs the instruction-tuning demonstration instead: the same model learns,
through its chat template and with a response-only loss, to answer questions as JSON (`instruct_json.jsonl`).

This is a toy base model: it learns spelling and common phrases, not reasoning. Point `--model` at a real
checkpoint for real work.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from .. import files
from ..train_config import TrainConfig

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "model"  # the pre-built default model
VERSION = "v1"  # bump when the recipe below changes, so stale caches are rebuilt
SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
VOCAB_SIZE = 2048
# A Gemma-style chat template written for this model (the tutorials' running example has the same shape).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)
PRETRAIN_STEPS = 300  # the shipped model's recipe (train loss ~0.5 on general.txt by then)


def cache_dir(steps: int) -> Path:
    root = os.environ.get("MINILORA_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minilora"
    return Path(root) / f"default-model-{VERSION}-{steps}"


def read_documents(name: str) -> list[str]:
    """Paragraphs (separated by blank lines) of a shipped text file."""
    text = (HERE / name).read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def train_tokenizer(out_dir: Path) -> dict:
    """Byte-level BPE on all shipped text; returns {special token: id}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(read_documents("general.txt") + read_documents("domain.txt"), trainer)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    # Like Llama 3's tokenizer: the post-processor adds BOS in front of every encoded text.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", ids["<bos>"])])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    files.write_json(out_dir / "tokenizer_config.json", {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "model_max_length": MODEL_SHAPE["max_position_embeddings"], "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    files.write_json(out_dir / "generation_config.json", {
        "bos_token_id": ids["<bos>"], "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
        "pad_token_id": ids["<pad>"],
    })
    return ids


def write_random_checkpoint(out_dir: Path, ids: dict, seed: int = 0) -> None:
    """A Llama checkpoint with GPT-2-style initialisation: N(0, 0.02), residual outputs scaled by
    1/sqrt(2 · layers) so the residual stream's variance does not grow with depth; norm gains 1."""
    s = MODEL_SHAPE
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB_SIZE,
        **s, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"], "pad_token_id": ids["<pad>"],
    }
    files.write_json(out_dir / "config.json", config)
    gen = torch.Generator().manual_seed(seed)
    C, I, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    D = C // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * D

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=gen) * std

    tensors = {"model.embed_tokens.weight": normal(VOCAB_SIZE, C), "model.norm.weight": torch.ones(C)}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": normal(C, C), p + "self_attn.k_proj.weight": normal(kv, C),
            p + "self_attn.v_proj.weight": normal(kv, C),
            p + "self_attn.o_proj.weight": normal(C, C, std=0.02 / (2 * L) ** 0.5),
            p + "mlp.gate_proj.weight": normal(I, C), p + "mlp.up_proj.weight": normal(I, C),
            p + "mlp.down_proj.weight": normal(C, I, std=0.02 / (2 * L) ** 0.5),
            p + "input_layernorm.weight": torch.ones(C), p + "post_attention_layernorm.weight": torch.ones(C),
        }
    files.save_safetensors(out_dir / "model.safetensors", tensors, metadata={"format": "pt"})


def build_default_model(target: Path, steps: int = PRETRAIN_STEPS) -> Path:
    """Build the pre-trained default model into `target` (atomically: in a temporary folder, then renamed)."""
    from ..trainer import train

    # One work folder per process: two runs starting at once (two terminals, parallel tests) must not build
    # into each other's files. Whichever finishes first publishes; the other keeps that model.
    work = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    init_dir = work / "init"
    init_dir.mkdir(parents=True)
    print(f"building the default model ({steps} pre-training steps) into {target} ...")
    ids = train_tokenizer(init_dir)
    write_random_checkpoint(init_dir, ids)
    pretrain = TrainConfig(
        model=str(init_dir), data=str(HERE / "general.txt"), mode="base", method="full", block_size=128,
        batch_size=16, lr=3e-3, weight_decay=0.1, warmup_steps=20, max_steps=steps, eval_every=0,
        val_fraction=0.05, output=str(work / "pretrain"), seed=0, log_every=50, dropout=0.0,
    )
    train(pretrain)
    built = work / "pretrain" / "model"
    if (target / "model.safetensors").is_file() and target.resolve() != SHIPPED.resolve():
        print(f"another process finished {target} first; keeping that one (same recipe)")
    else:
        shutil.rmtree(target, ignore_errors=True)
        try:
            built.rename(target)
        except OSError:  # a concurrent build published in between (rename onto a non-empty folder fails)
            if not (target / "model.safetensors").is_file():
                raise
    shutil.rmtree(work, ignore_errors=True)
    print(f"default model ready: {target}\n")
    return target


def ensure_default_model() -> Path:
    """The shipped default model, or (when it is missing or a rebuild is asked for) one built and cached here."""
    if (SHIPPED / "model.safetensors").is_file() and not os.environ.get("MINILORA_DEFAULT_REBUILD"):
        return SHIPPED
    steps = int(os.environ.get("MINILORA_DEFAULT_PRETRAIN_STEPS", PRETRAIN_STEPS))
    target = cache_dir(steps)
    if not (target / "model.safetensors").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        build_default_model(target, steps)
    return target


def main(argv: list[str] | None = None) -> int:
    """`python -m minilora.default.build`: (re)build the shipped default model."""
    parser = argparse.ArgumentParser(prog="python -m minilora.default.build", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(SHIPPED), help="where to write the model folder")
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS, help="pre-training steps")
    args = parser.parse_args(argv)
    build_default_model(Path(args.output).resolve(), args.steps)
    return 0


if __name__ == "__main__":
    from ..errors import run_cli

    sys.exit(run_cli(main))
