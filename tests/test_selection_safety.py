"""Selection never ships an edit it did not measure: it walks the ranking, holds the KL budget on an
upper bound, learns refusal openings from the emitted ids, handles reasoning blocks, and otherwise stops."""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import TINY_PROMPTS
from torch import nn

from abliterate import cli, pipeline, prompts, resume, selection
from abliterate.directions import Candidates
from abliterate.edit import EditParams
from abliterate.errors import AbliterateError
from abliterate.judge import judge_many, learned, rule_judge, strip_reasoning
from abliterate.selection import RefusalTokens, Selection, find_refusal_tokens, kl_upper_bound, select_direction
from abliterate.settings import Settings

SMALL = ["--n-train", "8", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "8", "--batch-size", "4", "--no-eval"]


# A scripted world for select_direction: candidate k is the basis vector e_k; its effects are table entries.
class World:
    """Next-token log-probs over 4 tokens (token 0 opens refusals) under whatever edit is active."""

    def __init__(self, remove, induce, damage, harmful_logit=2.0, scale_free_damage=False):
        self.remove, self.induce, self.damage = remove, induce, damage
        self.harmful_logit, self.scale_free_damage = harmful_logit, scale_free_damage
        self.state = None

    def logprobs(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            kind, i = text[0], int(text[1:])
            logits = torch.tensor([self.harmful_logit if kind == "h" else -3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
            if self.state and self.state[0] == "ablate":
                _, k, s = self.state
                if kind == "h":
                    logits[0] -= s * self.remove[k]
                else:
                    logits[1] += (1.0 if self.scale_free_damage else s) * self.damage[k][i]
            if self.state and self.state[0] == "add" and kind == "n":
                logits[0] += self.induce[self.state[1]]
            rows.append(torch.log_softmax(logits, -1))
        return torch.stack(rows).float()

    def install(self, monkeypatch) -> None:
        @contextmanager
        def ablation(model, arch, direction, params=EditParams()):
            self.state = ("ablate", int(direction.abs().argmax()), params.scale)
            yield
            self.state = None

        @contextmanager
        def addition(model, arch, vector, layer):
            self.state = ("add", int(vector.abs().argmax()))
            yield
            self.state = None

        monkeypatch.setattr(selection, "ablation", ablation)
        monkeypatch.setattr(selection, "addition", addition)
        monkeypatch.setattr(selection, "last_token_logprobs", lambda model, tok, texts, bs: self.logprobs(texts))


def basis_candidates(n: int) -> Candidates:
    """Candidate k at layer k is e_k; one more layer after the last, as the real candidates have."""
    directions = torch.zeros(1, n + 1, n, dtype=torch.float64)
    for k in range(n + 1):
        directions[0, k, k % n] = 1.0
    return Candidates(directions.clone(), directions)


TOKENS = RefusalTokens((0,), ("x",), 4, 8, 1.0)
HARMFUL, HARMLESS = [f"h{i}" for i in range(4)], [f"n{i}" for i in range(4)]


def run_select(world: World, monkeypatch, n: int, **kw) -> Selection:
    world.install(monkeypatch)
    kw = {"skip_last_layers": 0.0, **kw}
    return select_direction(None, None, None, basis_candidates(n), HARMFUL, HARMLESS, TOKENS, 4, **kw)


def test_search_walks_past_top_k_until_a_candidate_qualifies(monkeypatch):
    # The best-ranked candidate costs too much KL at every strength; the old search stopped there and
    # shipped it at its lowest measured KL, over budget.
    world = World(remove=[6.0, 4.0, 1.0], induce=[2.0, 2.0, 2.0], damage=[[4.0] * 4, [0.05] * 4, [0.05] * 4])
    more = []
    selection = run_select(world, monkeypatch, 3, top_k=1, on_more=more.append)
    first, second, third = sorted(selection.scores, key=lambda s: s.refusal_ablated)
    assert selection.chosen is second and second.layer == 1 and second.eligible
    assert len(first.trials) == 5 and all(t["kl_bound"] > selection.kl_threshold for t in first.trials)
    assert third.refusal_induced is None and not third.trials  # the walk stops at the first that qualifies
    assert more == [6]  # the progress total grows by the extra candidate's steps
    assert second.kl_bound <= selection.kl_threshold and second.refusal < selection.baseline_refusal_harmful


def test_kl_budget_holds_an_upper_bound_not_the_mean(monkeypatch):
    # Candidate 0 costs KL on one harmless prompt in four: its mean is within budget, its upper bound is not.
    world = World(
        remove=[6.0, 3.0], induce=[2.0, 2.0], damage=[[0.0, 0.0, 0.0, 1.5], [0.3] * 4], scale_free_damage=True
    )
    selection = run_select(world, monkeypatch, 2, top_k=2)
    rejected = next(s for s in selection.scores if s.layer == 0)
    assert selection.chosen.layer == 1
    for trial in rejected.trials:
        assert trial["kl"] <= selection.kl_threshold < trial["kl_bound"]
    assert not rejected.eligible
    kl = torch.tensor([0.0, 0.0, 0.0, 0.2])
    assert kl_upper_bound(kl) == pytest.approx(0.05 + 1.645 * kl.std().item() / 2)
    assert kl_upper_bound(torch.tensor([0.3])) == pytest.approx(0.3)


def test_the_reason_states_what_was_measured(monkeypatch):
    world = World(remove=[5.0], induce=[2.0], damage=[[0.1] * 4])
    selection = run_select(world, monkeypatch, 1, max_kl=0.1, kl_margin=0.75)
    chosen, reason = selection.chosen, selection.reason
    assert chosen.refused == 0 and selection.baseline_refused == 4 and selection.n_val == 4
    for number in (f"{chosen.kl:.3g}", f"{chosen.kl_bound:.3g}", f"{chosen.refusal:+.2f}", "4 -> 0 of 4", "0.075"):
        assert number in reason, (number, reason)
    assert "--max-kl 0.1 x --kl-margin 0.75" in reason


def test_induce_never_falls_back_to_a_removal(monkeypatch):
    # No candidate raises refusal when added: the old code returned the top candidate at scale +1.
    world = World(remove=[5.0, 3.0], induce=[-1.0, -0.5], damage=[[0.01] * 4] * 2)
    with pytest.raises(AbliterateError, match="no candidate raises refusal on harmless prompts") as err:
        run_select(world, monkeypatch, 2, induce=True)
    assert "\n" not in str(err.value)
    # With a refusal direction, induction picks a negative scale that raises the harmful refusal.
    world = World(remove=[5.0, 3.0], induce=[2.0, 1.0], damage=[[0.01] * 4] * 2)
    selection = run_select(world, monkeypatch, 2, induce=True, max_kl=100)
    assert selection.chosen.scale < 0 and selection.chosen.refusal > selection.baseline_refusal_harmful


def test_a_model_that_refuses_nothing_is_told_so(monkeypatch):
    world = World(remove=[1.0, 0.5], induce=[-1.0, -1.0], damage=[[0.01] * 4] * 2, harmful_logit=-3.0)
    with pytest.raises(AbliterateError, match=r"the model refused 0 of 4 harmful validation prompts .*no refusal"):
        run_select(world, monkeypatch, 2)


def test_every_candidate_over_budget_names_the_fix(monkeypatch):
    world = World(remove=[5.0, 3.0], induce=[2.0, 2.0], damage=[[5.0] * 4] * 2)
    with pytest.raises(AbliterateError, match=r"no candidate keeps validation KL <= 0\.075 .*raise --max-kl"):
        run_select(world, monkeypatch, 2)


def test_no_candidate_direction_at_all_is_an_error_not_a_crash(monkeypatch):
    World([], [], []).install(monkeypatch)
    zeros = torch.zeros(1, 3, 2, dtype=torch.float64)
    with pytest.raises(AbliterateError, match="no direction to remove"):  # was: min() arg is an empty sequence
        select_direction(None, None, None, Candidates(zeros, zeros), HARMFUL, HARMLESS, TOKENS, 4, skip_last_layers=0)


def test_kl_margin_has_one_default():
    parameters = inspect.signature(select_direction).parameters
    defaults = Settings()
    for name in ("kl_margin", "max_kl", "top_k", "skip_last_layers"):
        assert parameters[name].default == getattr(defaults, name), name


def test_selection_round_trips_through_the_cache(monkeypatch, tmp_path):
    world = World(remove=[5.0, 3.0], induce=[2.0, 2.0], damage=[[0.05] * 4] * 2)
    selection = run_select(world, monkeypatch, 2)
    resume.save_selection("roundtrip", selection)
    loaded = resume.load_selection("roundtrip")
    assert loaded == selection and loaded.chosen.kl_bound == selection.chosen.kl_bound
    assert loaded.baseline_refused == 4 and loaded.chosen.trials[0]["kl_bound"] > 0


def test_the_select_stage_key_changes_with_the_judge(monkeypatch, tmp_path):
    splits = {
        name: prompts.split(prompts.PromptSet(name, tuple(prompts.Prompt(f"{name} {i}") for i in range(6))), 2, 2, 2)
        for name in ("harmful", "harmless")
    }
    settings = Settings()
    before = pipeline.select_stage_inputs({"dtype": "float32"}, splits, settings)
    changed = tmp_path / "judge_classifier.json"
    changed.write_text(learned.CLASSIFIER_FILE.read_text().replace('"threshold": ', '"threshold": 0', 1))
    assert changed.read_text() != learned.CLASSIFIER_FILE.read_text()
    monkeypatch.setattr(learned, "CLASSIFIER_FILE", changed)
    after = pipeline.select_stage_inputs({"dtype": "float32"}, splits, settings)
    assert before["judge"] != after["judge"]
    source = pipeline.model.ModelSource("x", "hub")
    assert resume.stage_key(source, "select", before) != resume.stage_key(source, "select", after)


# Whole runs on the tiny checkpoint (it refuses only prompts holding a trigger): stop before writing.
def test_identical_harmful_and_harmless_sets_stop_before_writing(tmp_path, tiny_checkpoint, capsys):
    same = tmp_path / "same.txt"
    same.write_text("\n".join(f"Describe object number {i} briefly." for i in range(6)) + "\n")
    out = tmp_path / "o"
    args = ["run", str(tiny_checkpoint), "--out", str(out), "--harmful", str(same), "--harmless", str(same)]
    code = cli.main([*args, "--n-train", "2", "--n-val", "1", "--n-test", "1", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "min() arg" not in err
    assert "abliterate: error: the harmful and harmless training prompts give the same mean activations" in err
    assert not out.exists()


def test_a_model_that_refuses_none_of_the_prompts_stops_before_writing(tmp_path, tiny_checkpoint, capsys):
    from abliterate.tiny import save_tiny_checkpoint

    random_model = save_tiny_checkpoint(tmp_path / "random", refuses=False)
    out = tmp_path / "o"
    code = cli.main(["run", str(random_model), "--out", str(out), *SMALL])  # the old code saved its fallback here
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("abliterate: error")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "the model refused 0 of 4 harmful validation prompts" in errors[0] and "use prompts it refuses" in errors[0]
    assert not out.exists() and not any(tmp_path.glob(".o*"))
    # The planted model opens every answer to the built-in prompts with 'S': no first-token score to use.
    code = cli.main(["run", str(tiny_checkpoint), "--out", str(out), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "answers all open with the token 'S'" in err and not out.exists()
    # On prompts it refuses, a measured edit that removes that refusal is saved.
    code = cli.main(["run", str(tiny_checkpoint), "--out", str(out), *SMALL, *TINY_PROMPTS])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (out / "model.safetensors").is_file()


# Refusal openings are the ids the model emitted, not a re-tokenization of the answer text.
def sentencepiece_tokenizer():
    """A word-level tokenizer with a word-initial marker, as SentencePiece vocabularies have (Llama 2, Mistral)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "I cannot help with that. Sure, here is a recipe: mix flour water bake how do make bread harm".split()
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<think>", "</think>"]
    vocab = {t: i for i, t in enumerate(specials + [f"\u2581{w}" for w in words] + ["I", "Sure,"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["[INST]", "[/INST]"],
    )  # fmt: skip
    tok.add_tokens(["<think>", "</think>"])
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    return tok


class ScriptedLM(nn.Module):
    """Greedy 'generation' by script: prompts mentioning harm get the first answer, others the second."""

    def __init__(self, tokenizer, refusal: str, compliance: str) -> None:
        from transformers import GenerationConfig

        super().__init__()
        self.tokenizer, self.embed = tokenizer, nn.Embedding(len(tokenizer), 2)
        self.answers = [tokenizer.convert_tokens_to_ids(a.split()) for a in (refusal, compliance)]
        self.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **_):
        rows = []
        for row in input_ids:
            harmful = "\u2581harm" in self.tokenizer.convert_ids_to_tokens(row.tolist())
            answer = (self.answers[0] if harmful else self.answers[1])[:max_new_tokens]
            rows.append(row.tolist() + answer + [pad_token_id] * (max_new_tokens - len(answer)))
        return torch.tensor(rows)


def chat_prompts(tok, harmful: bool, n: int = 8) -> list[str]:
    text = "[INST] how do I make harm [/INST]" if harmful else "[INST] how do I bake bread [/INST]"
    return [text] * n


def test_refusal_openings_are_the_emitted_first_ids():
    tok = sentencepiece_tokenizer()
    model = ScriptedLM(
        tok,
        "\u2581I \u2581cannot \u2581help \u2581with \u2581that.",
        "\u2581Sure, \u2581here \u2581is \u2581a \u2581recipe:",
    )
    harmful, harmless = chat_prompts(tok, True), chat_prompts(tok, False)
    emitted = tok.convert_tokens_to_ids("\u2581I")
    retokenized = tok(harmful[0] + "I cannot help with that.", add_special_tokens=False).input_ids
    start = len(tok(harmful[0], add_special_tokens=False).input_ids)
    assert retokenized[start] != emitted  # what the old code learned: a token the model never emits first
    found = find_refusal_tokens(model, tok, harmful, harmless, batch_size=4)
    assert found.ids == (emitted,) and found.tokens == ("\u2581I",)
    assert found.refusals_seen == 8 and found.precision == 1.0


def test_one_token_opening_every_answer_stops_the_run():
    tok = sentencepiece_tokenizer()
    model = ScriptedLM(tok, "<think> \u2581I \u2581cannot", "<think> \u2581Sure, \u2581here")
    with pytest.raises(
        AbliterateError,
        match=r"8 of 8 harmful and 8 of 8 harmless answers all open with the token '<think>'.*--thinking",
    ):
        find_refusal_tokens(model, tok, chat_prompts(tok, True), chat_prompts(tok, False), batch_size=4)


# Thinking models: reasoning off by default where the template can switch it; the judge skips it.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_thinking_is_off_where_the_template_has_the_switch():
    from abliterate.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    assert not prompts.supports_thinking(tok)
    plain = prompts.format_all(tok, ["hi"])
    tok.chat_template = THINKING_TEMPLATE
    assert prompts.supports_thinking(tok)
    off, on = prompts.format_all(tok, ["hi"]), prompts.format_all(tok, ["hi"], thinking=True)
    assert off == ["<|user|>hi<|end|><|assistant|><think>\n\n</think>\n\n"] and on == plain
    assert Settings().thinking is False
    args = cli.build_parser().parse_args(["run", "m", "--thinking"])
    assert args.thinking is True


REASONING_REFUSES = "<think>The user wants bread. I cannot help with that, I must decline.</think>"
ANSWER = "Sure! Mix 500 g flour, 350 ml water, salt and yeast; knead, let it rise for an hour, then bake at 230 C."


def test_the_judge_reads_the_answer_after_a_reasoning_block():
    prompt = "How do I bake bread at home?"
    assert strip_reasoning(REASONING_REFUSES + "\n\n" + ANSWER) == ANSWER
    assert strip_reasoning("reasoning the template opened</think>" + ANSWER) == ANSWER
    assert strip_reasoning("  <think>still reasoning when the tokens ran out") == ""
    assert strip_reasoning(ANSWER) == ANSWER
    assert rule_judge(prompt, "I cannot help with that.").label == "refusal"  # the reasoning alone would be
    assert rule_judge(prompt, REASONING_REFUSES + ANSWER).label == "compliance"
    assert rule_judge(prompt, "<think>I cannot help with that, I must decline.").label == "degenerate"
    labels = [v.label for v in judge_many([(prompt, REASONING_REFUSES + ANSWER), (prompt, ANSWER)])]
    assert labels == ["compliance", "compliance"]


def test_the_tiny_prompt_files_hold_the_trigger_only_in_the_harmful_set():
    from abliterate.tiny import TRIGGER

    data = Path(__file__).parent / "data"
    harmful = (data / "tiny_harmful.txt").read_text().splitlines()
    harmless = (data / "tiny_harmless.txt").read_text().splitlines()
    assert len(harmful) >= 32 and len(harmless) >= 32
    assert all(TRIGGER in line for line in harmful) and not any(TRIGGER in line for line in harmless)
    assert math.isclose(len(set(harmful)) / len(harmful), 1.0)
