"""Terminal chat with one model, or with two side by side (`--compare`), streaming each answer."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from abliterate import model, prompts
from abliterate.errors import AbliterateError
from abliterate.settings import LoadOptions

COMMANDS = "/reset clears the conversation, /exit (or Ctrl-D) leaves"


@dataclass
class Chatter:
    """One model in the conversation, with its own history (its answers differ from the other's)."""

    label: str
    lm: model.LoadedModel
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class ChatOptions:
    """How answers are generated."""

    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy


def conversation_text(tokenizer, messages: list[dict], system: str | None) -> str:
    """The whole conversation as the model sees it, ending where its next answer begins."""
    if prompts.has_chat_template(tokenizer):
        full = ([{"role": "system", "content": system}] if system else []) + messages
        return tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
    # No template: earlier turns in the same plain format the pipeline uses, each followed by its answer.
    text = f"{system}\n\n" if system else ""
    for message in messages:
        if message["role"] == "user":
            text += prompts.PLAIN_TEMPLATE.format(system="", prompt=message["content"])
        else:
            text += f"{message['content']}\n\n"
    return text


def stream_answer(lm: model.LoadedModel, text: str, options: ChatOptions, write: Callable[[str], None]) -> str:
    """Generate in a thread and write each piece as it arrives; return the whole answer."""
    from transformers import GenerationMixin, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    tok = lm.tokenizer
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()

    class _StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    inputs = model.encode(tok, [text], lm.device)
    inputs.pop("position_ids")  # generate derives them from the attention mask
    sampling = (
        {"do_sample": True, "temperature": options.temperature}
        if options.temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                cast(GenerationMixin, lm.model).generate(
                    **inputs, **sampling, max_new_tokens=options.max_new_tokens, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopWhenAsked()]), pad_token_id=tok.pad_token_id,
                )  # fmt: skip
        except BaseException as exc:  # handed to the reading thread, which would otherwise wait forever
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    pieces = []
    try:
        for piece in streamer:
            pieces.append(piece)
            write(piece)
    finally:
        stop.set()  # on Ctrl-C the generating thread ends at its next token
        thread.join()
    if failure:
        raise AbliterateError(f"generation failed: {failure[0]}")
    return "".join(pieces).strip()


def reply(chatter: Chatter, user: str, options: ChatOptions, write: Callable[[str], None]) -> str:
    """Add the user's turn, stream the model's answer, and keep both in its history."""
    messages = [*chatter.history, {"role": "user", "content": user}]
    answer = stream_answer(
        chatter.lm, conversation_text(chatter.lm.tokenizer, messages, options.system), options, write
    )
    chatter.history = [*messages, {"role": "assistant", "content": answer}]
    return answer


def chat(chatters: list[Chatter], lines: Iterable[str], write: Callable[[str], None], options: ChatOptions) -> int:
    """Answer each user line with every model (labelled when there are two); return the number of turns."""
    turns = 0
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            for chatter in chatters:
                chatter.history = []
            write("(conversation cleared)\n")
            continue
        if line.startswith("/"):
            write(f"(unknown command {line.split()[0]}; {COMMANDS})\n")
            continue
        for chatter in chatters:
            if len(chatters) > 1:
                write(f"[{chatter.label}]\n")
            try:
                reply(chatter, line, options, write)
            except KeyboardInterrupt:
                write(" (interrupted; this turn is dropped)\n")
                break
            write("\n\n" if len(chatters) > 1 else "\n")
        turns += 1
    return turns


def labels(specs: list[str]) -> list[str]:
    """Short names for the models: the last part of each spec, marked when two are the same."""
    names = [Path(spec.rstrip("/")).name or spec for spec in specs]
    if len(names) == 2 and names[0] == names[1]:
        names = [f"{names[0]} (model)", f"{names[1]} (original)"]
    return names


def load_chatters(specs: list[str], load: LoadOptions, max_new_tokens: int,
                  progress: Callable[[str], None]) -> list[Chatter]:  # fmt: skip
    """Resolve every model first (so a typo fails fast), then load them."""
    sources = [model.resolve(spec, load.allow_pickle) for spec in specs]
    chatters = []
    for label, source in zip(labels(specs), sources):
        progress(f"loading {source.spec}")
        lm = model.load(source, load, progress)
        # Long conversations lose their oldest tokens rather than overflow the context.
        context = model.context_length(lm.model)
        if context:
            lm.tokenizer.model_max_length = max(8, context - max_new_tokens)
        if not prompts.has_chat_template(lm.tokenizer):
            progress(f"warning: {source.spec} has no chat template; using the plain '### Instruction' format")
        chatters.append(Chatter(label, lm))
    return chatters


def _terminal_lines() -> Iterable[str]:
    """User lines from the keyboard (with line editing) or from piped stdin; ends at EOF or Ctrl-C."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return


def run(specs: list[str], options: ChatOptions, load: LoadOptions = LoadOptions(), seed: int = 0) -> int:
    """`abliterate chat`: load the models, then converse on stdin/stdout; messages go to stderr."""
    if options.max_new_tokens < 1:
        raise AbliterateError("--max-new-tokens must be at least 1")
    if options.temperature < 0:
        raise AbliterateError("--temperature must be 0 (greedy) or positive")
    torch.manual_seed(seed)
    to_stderr = lambda message: print(message, file=sys.stderr)  # noqa: E731
    chatters = load_chatters(specs, load, options.max_new_tokens, to_stderr)
    to_stderr(f"chatting with {' and '.join(c.label for c in chatters)}; {COMMANDS}")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat(chatters, _terminal_lines(), write, options)
    return 0
