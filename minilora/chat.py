"""Interactive chat: a multi-turn conversation through the model's own chat template, streamed as it is generated.

The conversation is kept as messages, never as text. Every turn renders the whole conversation again with the
model's template and asks for the assistant's turn:

    messages = [system?, user_1, assistant_1, ..., user_n]
    prompt   = tokenizer.apply_chat_template(messages, add_generation_prompt=True)   # "...<start_of_turn>model\\n"
    reply    = generate(prompt) until an end-of-turn token                         # streamed to the terminal
    messages.append({"role": "assistant", "content": reply})

Re-rendering (rather than appending tokens to the previous prompt) is what the model saw in training: a
template may render earlier turns differently once later ones exist, and the reply is stored as text, as it will
be rendered next time. The cost is one prefill of the whole conversation per turn.

When to stop. A chat model ends its reply with the token that closes an assistant turn in its template —
`<end_of_turn>` (Gemma), `<|eot_id|>` (Llama 3), `<|im_end|>` (ChatML/Qwen), `<|end|>` (Phi-3), `</s>` (Llama 2,
Mistral) — which is not always among the tokenizer's eos ids. `end_of_turn_ids` finds it from the template
itself: render [user, assistant=MARKER] and take the first added token (a marker the tokenizer matches whole)
written after MARKER. Generation stops at that token or at any eos id.

    python -m minilora.generate --model DIR [--adapter DIR] --chat [--system "Answer in JSON."]
        [--tools tools.json] [--enable-thinking | --no-enable-thinking]

`--tools` (a JSON list of tool definitions) and `--enable-thinking` are handed to the template as the variables
`tools` and `enable_thinking`, as transformers' apply_chat_template(tools=..., enable_thinking=...) does: the
model sees the tools it may call and, for Qwen3-style templates, whether to think first.

Commands at the prompt: /reset (start over, keeping the system prompt), /quit (or Ctrl-D). Ctrl-C while the model
answers stops the reply (the unfinished exchange is forgotten); at the prompt it leaves. When the conversation
outgrows the model's context, the oldest exchanges are dropped (with a note).

Not handled: running the tools a reply calls (its tool-call text is printed as is), images, editing or
regenerating earlier turns, saving a conversation.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MiniloraError
from .generation import TextStreamer, generate

MARKER = "MINILORA_REPLY_MARKER"  # a reply no template trims or changes
COMMANDS = "/reset starts over, /quit or Ctrl-D leaves, Ctrl-C stops a reply"


# ----------------------------------------------------------------------------------------------------------
# When a reply ends
# ----------------------------------------------------------------------------------------------------------
def closing_token_id(tokenizer) -> int | None:
    """The token the template writes right after an assistant reply (e.g. <end_of_turn>), or None.

    Found by rendering, for any template: the first added token (special or not: some tokenizers do not flag
    their turn markers as special) after the reply's text. None for a template that closes a reply with plain
    text only (Alpaca-style "### Response:" prompts).
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": MARKER}]
    text = tokenizer.render_chat(messages, add_generation_prompt=False)
    at = text.rfind(MARKER)
    if at < 0:
        return None
    added = tokenizer.backend.get_added_tokens_decoder()  # {id: AddedToken}
    after = tokenizer.encode(text[at + len(MARKER):], add_special_tokens=False)
    return next((i for i in after if i in added), None)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos ids plus the template's closing token."""
    ids = list(tokenizer.eos_token_ids)
    closing = closing_token_id(tokenizer)
    if closing is not None and closing not in ids:
        ids.append(closing)
    return ids


# ----------------------------------------------------------------------------------------------------------
# One assistant turn
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Reply:
    text: str  # the reply without its end-of-turn token, as it goes into the conversation
    token_ids: list[int]  # every generated id, the end-of-turn token included when there is one
    stopped: bool  # True when the model ended its turn (not cut at max_new_tokens)


def chat_once(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
              top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
              stream=None, stop_ids: list[int] | None = None, template_vars: dict | None = None) -> Reply:
    """Generate the assistant's next turn for `messages` (the conversation so far, ending with a user turn).

    The model is fed exactly tokenizer.apply_chat_template(messages, add_generation_prompt=True).
    stop_ids: ids that end the reply (default end_of_turn_ids(tokenizer)). stream: called with each new token
    (B=1,) except the stop token. template_vars: extra template variables (tools=[...], enable_thinking=False).
    """
    stop = end_of_turn_ids(tokenizer) if stop_ids is None else list(stop_ids)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **(template_vars or {}))
    shown = None if stream is None else (lambda token: None if int(token[0]) in stop else stream(token))
    out = generate(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token_ids=stop,
                   generator=generator, stream=shown)
    new = out[0, len(prompt):].tolist()  # (new,)
    stopped = bool(new) and new[-1] in stop
    text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
    return Reply(text=text, token_ids=new, stopped=stopped)


def fit_context(tokenizer, messages: list[dict], max_positions: int, max_new_tokens: int,
                template_vars: dict | None = None) -> tuple[list, int]:
    """Drop the oldest exchanges (the system prompt stays) until the prompt leaves room to answer.

    Returns (messages, tokens the reply may take). Room kept for the reply: max_new_tokens, at most half the
    context — a 2,048-token answer budget must not erase a whole conversation on a 2,048-token model.
    """
    reserve = min(max_new_tokens, max_positions // 2)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        length = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **(template_vars or {})))
        if length + reserve <= max_positions:
            return messages, min(max_new_tokens, max_positions - length)
        user_turns = [i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"]
        if not user_turns:
            raise MiniloraError(f"this message makes a {length}-token prompt; the model's context is "
                                f"{max_positions} tokens: write a shorter one")
        messages = messages[:first] + messages[user_turns[0]:]  # drop everything before the next user turn


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
def load_tools(path) -> list[dict]:
    """`--tools FILE`: a JSON list of tool definitions (OpenAI style {"type": "function", "function": {...}}),
    passed to the chat template as `tools`, as transformers' apply_chat_template(tools=...) does."""
    import json

    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniloraError(f"{path}: cannot read the tool definitions: {e}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise MiniloraError(f"{path}: --tools needs a JSON list of tool definitions (objects), got "
                            f"{type(tools).__name__}")
    return tools


def check_template(tokenizer, system: str | None, where: str, template_vars: dict | None = None) -> None:
    """Fail early (one line) when the model cannot chat: no template, or a template that refuses the system."""
    if tokenizer.chat_template is None:
        raise MiniloraError(f"{where} has no chat template (tokenizer_config.json \"chat_template\" or "
                            "chat_template.jinja): --chat needs an instruct/chat model; use --prompt to continue text")
    start = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
    try:
        tokenizer.render_chat(start, add_generation_prompt=True, **(template_vars or {}))
    except MiniloraError as e:
        hint = " (this template may not accept a system prompt: drop --system)" if system else ""
        raise MiniloraError(f"{where}: the chat template cannot render a conversation: {e}{hint}") from None


def chat_loop(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
              top_k: int | None = None, top_p: float | None = None, generator=None, input_fn=input,
              out=None, err=None, template_vars: dict | None = None) -> list[dict]:
    """Read user lines with `input_fn` until /quit, EOF or Ctrl-C at the prompt; print each reply as it comes.

    Returns the final conversation (messages). out: where replies go (default stdout); err: notes (stderr).
    template_vars: extra chat-template variables for every turn (tools, enable_thinking).
    """
    out, err = out or sys.stdout, err or sys.stderr
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    stop = end_of_turn_ids(tokenizer)
    max_positions = model.config.max_position_embeddings
    print(f"chat: {COMMANDS}", file=err)
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return messages
        text = line.strip()
        if text in ("/quit", "/exit"):
            return messages
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=err)
            continue
        if not text:
            continue
        messages = _answer(model, tokenizer, messages + [{"role": "user", "content": line}], stop, max_positions,
                           dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator), out, err, template_vars or {})


def _answer(model, tokenizer, messages, stop, max_positions, sampling, out, err, template_vars) -> list[dict]:
    """One turn: fit the context, stream the reply, return the conversation with it (or without the turn)."""
    try:
        fitted, room = fit_context(tokenizer, messages, max_positions, sampling["max_new_tokens"], template_vars)
    except MiniloraError as e:
        print(f"error: {e}", file=err)
        return messages[:-1]
    if len(fitted) < len(messages):
        print(f"(dropped the oldest {len(messages) - len(fitted)} message(s): the conversation outgrew the "
              f"model's {max_positions}-token context)", file=err)
    streamer = TextStreamer(tokenizer, out)
    try:
        reply = chat_once(model, tokenizer, fitted, stream=streamer, stop_ids=stop, template_vars=template_vars,
                          **{**sampling, "max_new_tokens": room})
    except KeyboardInterrupt:
        out.write("\n")
        print("(reply interrupted; this exchange is forgotten)", file=err)
        return fitted[:-1]
    streamer.end()
    return fitted + [{"role": "assistant", "content": reply.text}]


def run_chat(model, tokenizer, args, generator) -> int:
    """The `--chat` command of `python -m minilora.generate`: check the template, then the interactive loop
    (line editing when a terminal is attached). `args` holds the parsed generate flags."""
    template_vars = {}  # --tools FILE and --enable-thinking / --no-enable-thinking reach the template
    if args.tools is not None:
        template_vars["tools"] = load_tools(args.tools)
    if args.enable_thinking is not None:
        template_vars["enable_thinking"] = args.enable_thinking
    check_template(tokenizer, args.system, args.model, template_vars)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (arrow keys and history for input())
    model.eval()
    chat_loop(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
              template_vars=template_vars)
    return 0
