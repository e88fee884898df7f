"""`python -m minilora.generate`: continue a text (--prompt) or hold a conversation (--chat), streamed.

    python -m minilora.generate --model DIR --prompt "Once upon a time" --max-new-tokens 50 --temperature 0.8
    python -m minilora.generate --model DIR --adapter ADAPTER --chat     # a conversation: see chat.py
    python -m minilora.generate --model DIR --chat --tools tools.json --no-enable-thinking
    python -m minilora.generate --model default --prompt "Haneul Tea Garden is"   # the shipped tiny model

The command only parses flags, loads the model (and adapter) and hands over: decoding lives in generation.py,
the conversation loop in chat.py.
"""

import argparse
import sys

import torch

from .errors import MiniloraError, run_cli
from .generation import TextStreamer, check_sampling, generate
from .model_names import resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minilora.generate",
                                     description="Generate text from a Hugging Face model folder with minilora.")
    parser.add_argument("--model", required=True, help="model folder (config.json, *.safetensors, tokenizer.json), "
                        "or 'default' (the shipped tiny model)")
    parser.add_argument("--prompt", help="text to continue (or use --chat)")
    parser.add_argument("--chat", action="store_true",
                        help="hold a conversation through the model's chat template (see minilora/chat.py)")
    parser.add_argument("--system", help="with --chat: a system prompt for the conversation")
    parser.add_argument("--tools", help="with --chat: a JSON file with a list of tool definitions for the template")
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="with --chat: set the template's enable_thinking (Qwen3-style reasoning on/off)")
    parser.add_argument("--adapter", help="LoRA adapter folder (PEFT format) to apply on top of the model")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the model's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    args = parser.parse_args(argv)
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.chat == (args.prompt is not None):
        raise MiniloraError("give either --prompt TEXT (continue a text) or --chat (a conversation), not "
                            f"{'both' if args.chat else 'neither'}")
    if args.system is not None and not args.chat:
        raise MiniloraError("--system is for --chat conversations; with --prompt, write it into the prompt")
    if (args.tools is not None or args.enable_thinking is not None) and not args.chat:
        raise MiniloraError("--tools and --enable-thinking are for --chat conversations (they go to the chat template)")

    from .formats.safetensors_folder import load_model
    from .tokenizer import check_fits_embedding, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.model = resolve_model(args.model)  # "default" → the shipped model; a Hub id → what to do instead
    model = load_model(args.model, dtype=args.dtype, device=device)  # first: its errors name the model folder
    tokenizer = load_tokenizer(args.model)
    check_fits_embedding(tokenizer, model.config.vocab_size, args.model)
    if args.adapter:
        from .adapter import load_adapter

        load_adapter(model, args.adapter, dtype=next(model.parameters()).dtype)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.chat:
        from .chat import run_chat

        return run_chat(model, tokenizer, args, generator)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise MiniloraError("the prompt encodes to no tokens; give a non-empty --prompt")
    streamer = TextStreamer(tokenizer)
    sys.stdout.write(args.prompt)
    generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
             eos_token_ids=tokenizer.eos_token_ids, generator=generator, stream=streamer,
             pad_token_id=tokenizer.pad_token_id)
    streamer.end()
    return 0


def cli() -> None:
    """Console-script entry point: user mistakes print one line and exit 1 (no traceback)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
