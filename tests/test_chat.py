"""abliterate chat: streamed answers, history per model, /reset, --compare labels, clean exit at EOF."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from abliterate import chat, cli, model, prompts
from abliterate.errors import AbliterateError
from abliterate.settings import LoadOptions
from abliterate.tiny import save_tiny_checkpoint, tiny_tokenizer

OPTIONS = chat.ChatOptions(max_new_tokens=6)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    # Random models without the planted refusal: different seeds give different answers.
    return tuple(
        save_tiny_checkpoint(root / name, seed=seed, refuses=False) for name, seed in (("edited", 0), ("original", 1))
    )


def load(folder) -> model.LoadedModel:
    return model.load(str(folder), LoadOptions(device="cpu"), progress=lambda _: None)


def greedy(lm: model.LoadedModel, text: str, n: int) -> str:
    """The same answer without streaming or threads, to check the streamed one against."""
    inputs = model.encode(lm.tokenizer, [text], "cpu")
    inputs.pop("position_ids")
    ids = lm.model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_conversation_text_with_and_without_template():
    for tok in (tiny_tokenizer(chat_template=True), tiny_tokenizer(chat_template=False)):
        first = [{"role": "user", "content": "hi"}]
        assert chat.conversation_text(tok, first, "be brief") == prompts.format_prompt(tok, "hi", "be brief")
        turns = first + [{"role": "assistant", "content": "hello there"}, {"role": "user", "content": "and?"}]
        text = chat.conversation_text(tok, turns, None)
        assert text.index("hi") < text.index("hello there") < text.index("and?")
        assert text.endswith(prompts.format_prompt(tok, "and?").removeprefix(tok.bos_token or ""))


def test_single_model_streams_keeps_history_and_resets(two_checkpoints):
    lm = load(two_checkpoints[0])
    talker = chat.Chatter("edited", lm)
    pieces: list[str] = []
    turns = chat.chat([talker], iter(["hello", "", "tell me more"]), pieces.append, OPTIONS)
    assert turns == 2 and len(talker.history) == 4
    assert [m["role"] for m in talker.history] == ["user", "assistant", "user", "assistant"]
    first, second = talker.history[1]["content"], talker.history[3]["content"]
    # The streamed answers are the greedy answers to the whole conversation so far.
    assert first == greedy(lm, chat.conversation_text(lm.tokenizer, talker.history[:1], None), 6)
    assert second == greedy(lm, chat.conversation_text(lm.tokenizer, talker.history[:3], None), 6)
    assert first in "".join(pieces) and second in "".join(pieces)

    pieces.clear()
    assert chat.chat([talker], iter(["/reset", "hello", "/exit", "never read"]), pieces.append, OPTIONS) == 1
    assert "(conversation cleared)" in pieces[0]
    assert talker.history[:2] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    assert len(talker.history) == 2


def test_compare_labels_both_answers_and_keeps_separate_histories(two_checkpoints):
    edited, original = (chat.Chatter(label, load(f)) for label, f in zip(("edited", "original"), two_checkpoints))
    out = io.StringIO()
    chat.chat([edited, original], iter(["hi"]), out.write, OPTIONS)
    text = out.getvalue()
    a, b = edited.history[1]["content"], original.history[1]["content"]
    assert a != b  # different weights, different answers: each history holds its own model's answer
    assert text.index("[edited]\n") < text.index(a) < text.index("[original]\n") < text.rindex(b)


def test_generation_failure_and_interrupt_do_not_hang_or_corrupt_history(two_checkpoints, monkeypatch):
    lm = load(two_checkpoints[0])
    talker = chat.Chatter("m", lm)

    written: list[str] = []

    def interrupt(piece):  # Ctrl-C while the first piece of the first answer is shown
        written.append(piece)
        if len(written) == 1:
            raise KeyboardInterrupt

    chat.chat([talker], iter(["first", "second"]), interrupt, chat.ChatOptions(max_new_tokens=6))
    assert "interrupted" in written[1]
    assert [m["content"] for m in talker.history[::2]] == ["second"]  # the first turn was dropped, the loop went on
    monkeypatch.setattr(lm.model, "generate", lambda **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(AbliterateError, match="generation failed: boom"):
        chat.chat([talker], iter(["second"]), lambda _: None, OPTIONS)


def test_sampling_follows_the_seed(two_checkpoints):
    lm = load(two_checkpoints[0])
    answers = []
    for _ in range(2):
        torch.manual_seed(3)
        talker = chat.Chatter("m", lm)
        chat.chat([talker], iter(["hi"]), lambda _: None, chat.ChatOptions(max_new_tokens=8, temperature=5.0))
        answers.append(talker.history[1]["content"])
    assert answers[0] == answers[1] != greedy(lm, chat.conversation_text(lm.tokenizer, talker.history[:1], None), 8)


def test_labels():
    assert chat.labels(["runs/qwen05/", "qwen2.5-coder-0.5b-instruct"]) == ["qwen05", "qwen2.5-coder-0.5b-instruct"]
    assert chat.labels(["a/model", "b/model"]) == ["model (model)", "model (original)"]


def test_cli_compare_on_piped_stdin_exits_cleanly_at_eof(two_checkpoints):
    edited, original = map(str, two_checkpoints)
    r = run_cli_input(["chat", edited, "--compare", original, "--max-new-tokens", "4"], "hi\n/reset\nagain\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[edited]\n") == 2 and r.stdout.count("[original]\n") == 2
    assert "(conversation cleared)" in r.stdout and "Traceback" not in r.stderr


def run_cli_input(args, stdin: str):
    return subprocess.run(
        [sys.executable, "-m", "abliterate.cli", *args], input=stdin, capture_output=True, text=True,
        env=os.environ.copy(), timeout=300,
    )  # fmt: skip


def test_bad_options_fail_in_one_line(two_checkpoints, capsys):
    assert cli.main(["chat", str(two_checkpoints[0]), "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert cli.main(["chat", "no-such-model"]) == 2
    assert "neither a local path" in capsys.readouterr().err


def test_conversation_longer_than_the_context_keeps_its_end(two_checkpoints):
    talker = chat.load_chatters([str(two_checkpoints[0])], LoadOptions(device="cpu"), 6, lambda _: None)[0]
    assert talker.lm.tokenizer.model_max_length == 1024 - 6  # the tiny model's context minus room for the answer
    chat.chat([talker], iter(["x" * 3000, "short"]), lambda _: None, OPTIONS)
    assert len(talker.history) == 4
