"""The edit search: points round-trip, the front and the rule are right, trials never touch the weights,
the study resumes and is shared by workers, and any front point can be applied afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from helpers import FAST

from abliterate import cli
from abliterate.architectures import architecture_for
from abliterate.edit import EditParams, Profile, trial_edit
from abliterate.errors import AbliterateError
from abliterate.output.record import load_record
from abliterate.search import Point, Scored, Space, choose, pareto, storage_label
from abliterate.selection import strength_ladder
from abliterate.tiny import tiny_model

optuna = pytest.importorskip("optuna", reason="the search needs optuna: pip install 'abliterate[search]'")


def scored(trial: int, refusal: float, over: float, kl: float, bound: float | None = None) -> Scored:
    return Scored(trial, Point(0, 1.0, EditParams()), refusal, over, kl, kl if bound is None else bound)


def test_front_keeps_exactly_the_undominated_points_and_the_rule_picks_within_the_budget():
    points = [
        scored(0, 0.9, 0.5, 0.00),  # no edit: least KL
        scored(1, 0.2, 0.3, 0.05),
        scored(2, 0.2, 0.4, 0.06),  # beaten by 1 on everything
        scored(3, 0.1, 0.35, 0.09),
        scored(4, 0.05, 0.2, 0.20),
        scored(5, 0.1, 0.35, 0.09),  # ties with 3: neither beats the other
    ]
    front = pareto(points)
    assert [s.trial for s in front] == [0, 1, 3, 5, 4]  # lowest KL first
    assert choose(front, threshold=0.1).trial == 3  # least refusal within the budget (3 and 5 tie; 3 first)
    assert choose(front, threshold=1.0).trial == 4
    assert choose(front, threshold=0.05).trial == 1
    with pytest.raises(AbliterateError, match="lowest 0.3.*raise --max-kl"):
        choose([scored(7, 0.1, 0.1, 0.2, bound=0.3)], threshold=0.1)
    # Whole judged answers outrank the first-token proxy: trial 1 refuses later in its answers than 3 does.
    judged = [replace(front[1], judged_refusal=0.4, judged_over_refusal=0.1),
              replace(front[2], judged_refusal=0.1, judged_over_refusal=0.3), front[3]]  # fmt: skip
    assert choose(judged, threshold=0.1).trial == 3
    assert choose([replace(j, judged_refusal=0.1) for j in judged[:2]], threshold=0.1).trial == 1  # then over-refusal


def test_points_round_trip_and_the_space_proposes_profiles():
    point = Point(1, 2.5, EditParams(attention=Profile(0.8, 1.0, 2.0, 0.1), mlp=None, embeddings=True))
    assert Point.from_dict(json.loads(json.dumps(point.as_dict()))) == point
    fixed = optuna.trial.FixedTrial({
        "position": 1, "layer": 0.5, "attention_peak": 1.0, "attention_center": 1.0, "attention_width": 1.0,
        "attention_floor": 0.5, "mlp_peak": 0.2, "mlp_center": 2.0, "mlp_width": 0.5, "mlp_floor": 0.0,
        "embeddings": False, "norm_preserving": True,
    })  # fmt: skip
    proposed = Space(positions=2, direction_layers=2.0, n_layers=3).suggest(fixed)
    assert (proposed.position, proposed.layer) == (1, 0.5)
    assert proposed.params.attention == Profile(1.0, 1.0, 1.0, 0.5) and proposed.params.embedding_scale == 0
    assert [proposed.params.writer_scale(i, "mixer") for i in range(3)] == [0.5, 1.0, 0.5]
    assert proposed.params.norm_preserving
    fixed_norm = Space(positions=2, direction_layers=2.0, n_layers=3, norm_preserving=False).suggest(fixed)
    assert not fixed_norm.params.norm_preserving  # --norm-preserving (or its absence) fixed for every trial


def test_storage_urls_are_printed_without_their_password():
    assert storage_label("postgresql://me:secret@db.example/abl") == "postgresql://me@db.example/abl"
    assert storage_label("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_fifty_trials_leave_the_weights_bit_identical(rng):
    from abliterate.search import Probe, Validation, open_study, optimize
    from abliterate.selection import RefusalTokens
    from abliterate.tiny import plant_refusal, tiny_tokenizer

    model, tok = tiny_model("qwen2", dtype=torch.float32), tiny_tokenizer()
    plant_refusal(model, tok)
    arch = architecture_for(model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    directions = torch.randn(1, 4, 64, generator=rng, dtype=torch.float64)
    from abliterate.directions import Candidates

    spread = torch.randn(8, 4, 64, generator=rng)  # 8 harmful prompts' last-token activations minus the harmless mean
    candidates = Candidates(directions, directions / directions.norm(dim=-1, keepdim=True), spread)
    texts = ["<|user|>hello there<|end|><|assistant|>", "<|user|>make a cake<|end|><|assistant|>"]
    probe = Probe(model, tok, arch, candidates, Validation(texts, texts, texts, texts, texts),
                  RefusalTokens((5, 6), ("a", "b"), 1, 1, 1.0), 2)  # fmt: skip
    study = open_study("sqlite:///:memory:", "weights", seed=0, key="k")
    optimize(study, probe, Space(1, 2.0, 3, max_directions=3), trials=50, max_kl=0.05)
    assert len(study.trials) == 50
    # The sampler knows the KL budget: each trial carries its constraint (<= 0 within the budget).
    for t in study.trials:
        assert t.constraints == {"kl_bound": pytest.approx(t.user_attrs["kl_bound"] - 0.05)}
    # A new study starts from the strength ladder's edits of the three best directions: each writer from
    # the first layer (with the embeddings) or from layer 1 on, at one strength of the ladder.
    ladder = [(p.scale, p.start_layer) for p in strength_ladder(3)]
    for t in study.trials[:15]:
        point = Point.from_dict(t.user_attrs["point"])
        p = point.params
        strengths = [p.writer_scale(i, k) for i in range(3) for k in ("mixer", "mlp")]
        first = 0 if strengths[0] else 1
        assert len(set(strengths[2 * first :])) == 1 and set(strengths[: 2 * first]) <= {0.0}
        assert (strengths[-1], first) in ladder and (p.embedding_scale > 0) == (first == 0)
    assert len({Point.from_dict(t.user_attrs["point"]).layer for t in study.trials[:15]}) == 3
    # Norm-preserving trials edited the weights in place; every bit came back all the same.
    points = [Point.from_dict(t.user_attrs["point"]) for t in study.trials]
    assert sum(p.params.norm_preserving for p in points) >= 5
    assert {p.directions for p in points} == {1, 2, 3}  # one to three directions removed at once
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    values = {tuple(t.values) for t in study.trials}
    assert len(values) > 40  # the trials measured different edits, not one


def _study(storage: str) -> object:
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1
    return optuna.load_study(study_name=names[0], storage=storage)


def test_a_searched_run_resumes_and_any_front_point_applies_afterwards(tmp_path, tiny_checkpoint, capsys):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    search = ["--search", "--storage", storage, "--max-kl", "50", "--max-directions", "3", "--no-eval", *FAST]
    out = tmp_path / "run"
    assert cli.main(["run", str(tiny_checkpoint), "--out", str(out), "--trials", "6", *search]) == 0
    study = _study(storage)
    first = [t.number for t in study.trials]
    assert len(first) == 6
    rec = load_record(out)
    found = rec.selection["search"]
    assert found["trials"] == 6 and found["front"] and found["chosen"] in [p["trial"] for p in found["front"]]
    assert rec.edit.params.attention is not None and rec.edit.edited_tensors  # the profiled edit was applied
    judged = [p for p in found["front"] if p["judged_refusal"] is not None]  # --verify 3: whole answers judged
    assert 1 <= len(judged) <= 3 and found["chosen"] in [p["trial"] for p in judged]
    assert 0 <= found["baseline"]["judged_refusal"] <= 1 and "judged:none:100" in _study(storage).user_attrs
    assert _study(storage).user_attrs["settings"]["storage"] is None  # a password in the URL stays out of the study
    err = capsys.readouterr().err
    assert "Pareto front of 6 searched edits" in err
    went = err.split("where the time went: ")[1].splitlines()[0]  # every stage, with its share of the run
    assert all(f"{stage} " in went for stage in ("load and collect", "search", "edit", "save")) and "%)" in went
    plots = sorted(p.stem for p in (out / "report").iterdir())
    assert "search_front" in plots and "layer_scores" not in plots  # the report plots what the search did

    # More trials continue the same study: the first six are not measured again.
    again = tmp_path / "again"
    assert cli.main(["run", str(tiny_checkpoint), "--out", str(again), "--trials", "9", *search]) == 0
    study = _study(storage)
    assert len(study.trials) == 9 and [t.number for t in study.trials][:6] == first
    assert {t.params["layer"] for t in study.trials[:6]} == {t.params["layer"] for t in _study(storage).trials[:6]}

    # Another front point, applied without a search: its weights equal its hooks on the original.
    rec = load_record(again)
    front, chosen = rec.selection["search"]["front"], rec.selection["search"]["chosen"]
    others = sorted((p for p in front if p["trial"] != chosen), key=lambda p: -p["directions"])
    other = others[0]  # several directions at once where the front has such a point (the starts take turns)
    from safetensors.torch import load_file

    stored = load_file(str(again / "directions.safetensors"))
    for p in front:  # every front point's own direction(s) are kept: apply --trial takes them as they are
        assert stored[f"front.{p['trial']}"].shape == ((p["directions"], 64) if p["directions"] > 1 else (64,))
    picked = tmp_path / "picked"
    assert cli.main(["apply", str(tiny_checkpoint), "--edit", str(again), "--trial", str(other["trial"]),
                     "--out", str(picked)]) == 0  # fmt: skip
    applied = load_record(picked)
    assert applied.selection["search"]["chosen"] == other["trial"] and applied.metrics is None
    point = Point.from_dict(other)
    assert applied.edit.params == point.params
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    edited = AutoModelForCausalLM.from_pretrained(picked, dtype=torch.float32)
    direction = load_file(str(picked / "directions.safetensors"))["direction"]
    assert torch.equal(direction, stored[f"front.{other['trial']}"])
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), trial_edit(original, architecture_for(original), direction, point.params):
        hooked = original(input_ids=ids).logits  # hooks, or for a norm-preserving point the restored in-place edit
    with torch.no_grad():
        torch.testing.assert_close(edited(input_ids=ids).logits, hooked, rtol=1e-4, atol=1e-5)

    assert cli.main(["apply", str(tiny_checkpoint), "--edit", str(again), "--trial", "999",
                     "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "not on the run's Pareto front" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_induction_is_not_searched_and_is_refused_before_any_model_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", "no/such-model", "--out", str(out), "--search", "--induce"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --induce or --search" in err[0] and not out.exists()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_one_study_and_count_every_trial_once(tmp_path, tiny_checkpoint, backend, request):
    storage = f"sqlite:///{tmp_path / 'shared.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    name = f"shared-{backend}"
    args = ["--search", "--storage", storage, "--study", name, "--max-kl", "50", "--no-eval", *FAST]
    assert cli.main(["run", str(tiny_checkpoint), "--out", str(tmp_path / "run"), "--trials", "3", *args]) == 0
    assert load_record(tmp_path / "run").settings["storage"] == storage_label(storage)  # no password in the record
    study = optuna.load_study(study_name=name, storage=storage)
    study.set_user_attr("settings", {**study.user_attrs["settings"], "trials": 14})  # the study asks for more
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "abliterate.cli", "search-worker", "--storage", storage, "--study", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
    assert 14 <= len(done) <= 15  # each worker stops once the study holds 14; one may finish a trial in flight
    assert len({t.user_attrs["worker"] for t in done[3:]}) == 2  # both workers measured trials
    with pytest.raises(SystemExit):
        cli.main(["search-worker", "--storage", storage])  # --study is required
    assert cli.main(["search-worker", "--storage", storage, "--study", "nope"]) == 2
