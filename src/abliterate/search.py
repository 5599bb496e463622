"""3b. Search the edit space: a Pareto front of refusal, over-refusal and damage, found with forward passes.

Each trial is one edit: a direction (any position, at a fractional layer index that blends two
neighbouring layers' directions), a strength profile over layers for the token-mixer writers and
another for the feed-forward writers, the embeddings on or off, and norm preservation on or off. It
is measured through hooks, which equal the weight edit exactly; a norm-preserving edit has no hook
form, so its trial edits the weights in place and restores them bit for bit. No trial reloads the
model. Three numbers are minimized on
validation prompts only: refusal (the mean probability of a refusal opening on harmful prompts),
over-refusal (the same on benign prompts with alarming words) and first-token KL on harmless ones.

Optuna's multi-objective TPE sampler (seeded, told the KL budget as a constraint) proposes the
trials, after the strength ladder's own edits of the three most promising directions; the study lives in an Optuna storage, a
SQLite file in the cache by default or any storage URL (postgresql://...), so an interrupted search
resumes and workers on several machines share one study.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from abliterate import offline
from abliterate.architectures import Architecture
from abliterate.directions import Candidates
from abliterate.edit import EditParams, Profile, ablation, trial_edit
from abliterate.errors import AbliterateError, require
from abliterate.judge import judge_many
from abliterate.model import generate, kl_divergence, last_token_logprobs
from abliterate.selection import RefusalTokens, kl_upper_bound, refusal_log_odds, strength_ladder

OBJECTIVES = ("refusal", "over_refusal", "kl")  # all minimized
MAX_STRENGTH = 1.25  # a little past full removal: partial layers may need more than their share
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process measured a trial, for a shared study
SPACE_VERSION = 2  # part of the study's key: a changed space starts a new study instead of mixing trials


def default_storage() -> str:
    """A SQLite file in the cache: every study of this machine, resumable."""
    folder = offline.cache_dir() / "search"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'studies.db'}"


def storage_label(url: str) -> str:
    """A storage URL as it may be printed and recorded: without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest.split("/")[0]:
        credentials, host = rest.split("@", 1)
        return f"{scheme}{sep}{credentials.split(':')[0]}@{host}"
    return url


def study_settings(storage: str, name: str) -> dict[str, Any]:
    """The settings of the run that started a study, as it stored them (what a worker needs to join)."""
    optuna = require("optuna", "search", "the edit search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise AbliterateError(
            f"no study '{name}' in {storage_label(storage)}; start it with `abliterate run --search --storage URL "
            "--study NAME`"
        ) from None
    except (ImportError, ValueError) as exc:
        raise AbliterateError(f"cannot open search storage {storage_label(storage)} ({exc}); check --storage") from None
    if "settings" not in study.user_attrs:
        raise AbliterateError(f"study '{name}' was not started by abliterate; pass the name `abliterate run` printed")
    return dict(study.user_attrs["settings"])


@dataclass(frozen=True)
class Point:
    """One edit of the space: where its direction comes from and how strongly each writer removes it."""

    position: int  # candidate position (0: the last prompt token)
    layer: float  # fractional layer index of the direction
    params: EditParams
    directions: int = 1  # removed at once: the mean difference, then the harmful prompts' principal directions

    def direction(self, candidates: Candidates) -> torch.Tensor:
        """The unit direction this point removes, or for several an orthonormal (k, hidden) basis."""
        return candidates.several(self.position, self.layer, self.directions)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"position": self.position, "layer": self.layer, "directions": self.directions,
                "params": asdict(self.params)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Point:
        """Read the JSON form back."""
        p = dict(data["params"])
        for kind in ("attention", "mlp"):
            p[kind] = Profile(**p[kind]) if p.get(kind) else None
        return cls(int(data["position"]), float(data["layer"]), EditParams(**p), int(data.get("directions", 1)))


@dataclass(frozen=True)
class Space:
    """The bounds of the search: positions, the layers a direction may come from, the model's depth."""

    positions: int
    direction_layers: float  # directions come from layer indices 0..direction_layers
    n_layers: int  # decoder layers, for the profiles' centres and widths
    norm_preserving: bool | None = None  # None: searched; True or False: every trial
    max_directions: int = 1  # up to this many directions removed at once (they need position 0)

    def suggest(self, trial: Any) -> Point:
        """The point an Optuna trial proposes."""
        last = self.n_layers - 1

        def profile(kind: str) -> Profile:
            peak = trial.suggest_float(f"{kind}_peak", 0.0, MAX_STRENGTH)
            return Profile(
                peak=peak,
                center=trial.suggest_float(f"{kind}_center", 0.0, float(last)),
                width=trial.suggest_float(f"{kind}_width", 0.5, float(self.n_layers)),
                floor=peak * trial.suggest_float(f"{kind}_floor", 0.0, 1.0),  # a share of the peak
            )

        position = trial.suggest_int("position", 0, self.positions - 1) if self.positions > 1 else 0
        layer = trial.suggest_float("layer", 0.0, self.direction_layers)
        attention, mlp = profile("attention"), profile("mlp")
        embeddings = trial.suggest_categorical("embeddings", [False, True])
        norm = self.norm_preserving
        if norm is None:
            norm = trial.suggest_categorical("norm_preserving", [False, True])
        params = EditParams(scale=1.0, attention=attention, mlp=mlp, embeddings=embeddings, norm_preserving=norm)
        k = trial.suggest_int("directions", 1, self.max_directions) if self.max_directions > 1 else 1
        return Point(position, layer, params, k if position == 0 else 1)

    def plain(self, layer: float, strength: float, start_layer: int = 0) -> dict[str, Any]:
        """The trial parameters of a plain edit: every writer from start_layer on at one strength.

        These are the edits the strength ladder tries (the embeddings go with start_layer 0); a new
        study starts from them, so the sampler begins where plain abliteration works.
        """
        last = self.n_layers - 1
        span = {"peak": strength, "center": (start_layer + last) / 2, "width": max(0.5, (last - start_layer) / 2),
                "floor": 1.0}  # fmt: skip
        profiles = {f"{kind}_{key}": value for kind in ("attention", "mlp") for key, value in span.items()}
        return {"layer": min(layer, self.direction_layers), **profiles, "embeddings": start_layer == 0} | (
            {"position": 0} if self.positions > 1 else {}
        )

    def starts(self, layers: list[int]) -> list[dict[str, Any]]:
        """The strength ladder's edits of each of the given directions, taking turns with and without norm
        preservation and with one to max_directions directions where those are searched (a sampler whose
        history has only one value of a choice hardly ever tries another)."""
        plain = [self.plain(layer, p.scale, p.start_layer) for layer in layers for p in strength_ladder(self.n_layers)]
        norm = lambda i: {"norm_preserving": i % 2 == 1} if self.norm_preserving is None else {}  # noqa: E731
        k = lambda i: {"directions": 1 + (i // 2) % self.max_directions} if self.max_directions > 1 else {}  # noqa: E731
        return [start | norm(i) | k(i) for i, start in enumerate(plain)]


@dataclass(frozen=True)
class Scored:
    """A measured trial."""

    trial: int
    point: Point
    refusal: float  # mean P(refusal opening), harmful validation prompts
    over_refusal: float  # the same, benign validation prompts
    kl: float  # mean first-token KL, harmless validation prompts
    kl_bound: float  # its one-sided 95% upper bound
    judged_refusal: float | None = None  # share of whole greedy answers judged refusals, where generated
    judged_over_refusal: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"trial": self.trial, **self.point.as_dict(), "refusal": self.refusal,
                "over_refusal": self.over_refusal, "kl": self.kl, "kl_bound": self.kl_bound,
                "judged_refusal": self.judged_refusal, "judged_over_refusal": self.judged_over_refusal}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scored:
        """Read the JSON form back."""
        return cls(int(data["trial"]), Point.from_dict(data), data["refusal"], data["over_refusal"], data["kl"],
                   data["kl_bound"], data.get("judged_refusal"), data.get("judged_over_refusal"))  # fmt: skip


@dataclass(frozen=True)
class Validation:
    """The chat-formatted validation prompts a trial is measured on, and the judged sets as written."""

    harmful: list[str]
    harmless: list[str]
    benign: list[str]
    harmful_prompts: list[str]  # `harmful` before formatting: what the judge reads with each answer
    benign_prompts: list[str]


@dataclass
class Probe:
    """Measures one point with hooks: the model is never changed."""

    model: nn.Module
    tokenizer: Any
    arch: Architecture
    candidates: Candidates
    prompts: Validation
    refusal_tokens: RefusalTokens
    batch_size: int
    base_harmless: torch.Tensor = field(init=False)
    baseline: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.base_harmless = self._logprobs(self.prompts.harmless)
        self.baseline = {
            "refusal": self._refusal(self.prompts.harmful),
            "over_refusal": self._refusal(self.prompts.benign),
        }

    def _logprobs(self, texts: list[str]) -> torch.Tensor:
        return last_token_logprobs(self.model, self.tokenizer, texts, self.batch_size)

    def _refusal(self, texts: list[str]) -> float:
        odds = refusal_log_odds(self._logprobs(texts), self.refusal_tokens.ids)
        return torch.sigmoid(odds).mean().item()  # log-odds -> probability of a refusal opening

    def judge(self, point: Point | None, tokens: int) -> tuple[float, float]:
        """Shares of whole greedy answers (up to `tokens`) judged refusals, harmful then benign; None: no edit."""
        edit = trial_edit(self.model, self.arch, point.direction(self.candidates), point.params) if point else None
        with edit or contextlib.nullcontext():
            harmful = generate(self.model, self.tokenizer, self.prompts.harmful, tokens, self.batch_size)
            benign = generate(self.model, self.tokenizer, self.prompts.benign, tokens, self.batch_size)

        def refused(prompts: list[str], answers: list[str]) -> float:
            verdicts = judge_many(zip(prompts, answers))
            return sum(v.label == "refusal" for v in verdicts) / max(1, len(verdicts))

        return refused(self.prompts.harmful_prompts, harmful), refused(self.prompts.benign_prompts, benign)

    def rank_layers(self, space: Space, top: int = 3) -> list[int]:
        """The layers whose direction, fully removed, leaves the least refusal: where a new study starts."""
        scores = []
        norms = self.candidates.diffs[0].norm(dim=-1)
        for layer in range(int(space.direction_layers) + 1):
            if norms[layer] <= 1e-6 * norms.max():
                continue  # e.g. the embedding of a last token every prompt shares: no direction at all
            with ablation(self.model, self.arch, self.candidates.between(0, layer), EditParams()):
                scores.append((self._refusal(self.prompts.harmful), layer))
        return [layer for _, layer in sorted(scores)[:top]]

    def measure(self, point: Point) -> tuple[float, float, float, float]:
        """(refusal, over-refusal, KL, KL upper bound) with the point's edit in place (the model restored after)."""
        with trial_edit(self.model, self.arch, point.direction(self.candidates), point.params):
            kl = kl_divergence(self.base_harmless, self._logprobs(self.prompts.harmless))
            refusal, over = self._refusal(self.prompts.harmful), self._refusal(self.prompts.benign)
        return refusal, over, kl.mean().item(), kl_upper_bound(kl)


@dataclass(frozen=True)
class SearchResult:
    """Every measured trial of the study, its Pareto front and the point chosen by rule."""

    trials: list[Scored]
    front: list[Scored]
    chosen: Scored
    baseline: dict[str, float]
    kl_threshold: float
    storage: str
    study: str
    reason: str
    refusal_tokens: RefusalTokens

    def as_dict(self) -> dict[str, Any]:
        """JSON form, for the run record."""
        return {
            "study": self.study,
            "storage": storage_label(self.storage),
            "objectives": list(OBJECTIVES),
            "baseline": self.baseline,
            "kl_threshold": self.kl_threshold,
            "chosen": self.chosen.trial,
            "front": [s.as_dict() for s in self.front],
            "trials": len(self.trials),
        }


def pareto(scored: list[Scored]) -> list[Scored]:
    """The trials no other trial beats on all three objectives at once, lowest KL first."""
    key = lambda s: (s.refusal, s.over_refusal, s.kl)  # noqa: E731
    front = [
        s for s in scored if not any(all(a <= b for a, b in zip(key(o), key(s))) and key(o) != key(s) for o in scored)
    ]
    return sorted(front, key=lambda s: (s.kl, s.refusal, s.trial))


def within_budget(front: list[Scored], threshold: float) -> list[Scored]:
    """The front points whose KL upper bound is within the budget, least proxy refusal first; one line if none."""
    within = [s for s in front if s.kl_bound <= threshold]
    if not within:
        lowest = min(s.kl_bound for s in front)
        raise AbliterateError(
            f"no searched edit keeps the validation KL upper bound within {threshold:.3g} (lowest {lowest:.3g}); "
            "raise --max-kl or --trials"
        )
    return sorted(within, key=lambda s: (round(s.refusal, 4), s.over_refusal, s.kl))


def choose(front: list[Scored], threshold: float) -> Scored:
    """By rule, within the KL budget: least judged refusal where answers were judged, then least judged
    over-refusal; among unjudged points, least proxy refusal, then over-refusal."""
    within = within_budget(front, threshold)
    judged = [s for s in within if s.judged_refusal is not None and s.judged_over_refusal is not None]
    if judged:
        return min(judged, key=lambda s: (s.judged_refusal, s.judged_over_refusal, s.refusal))
    return within[0]


def open_study(storage: str, name: str, seed: int, key: str) -> Any:
    """Create the study, or join the one under this name; a study made for other inputs is refused."""
    optuna = require("optuna", "search", "the edit search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            directions=["minimize"] * len(OBJECTIVES),
            # Multi-objective TPE models the trials from the 10th on; NSGA-II would sample its whole first
            # population (50) at random, which is most of a search's budget here.
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True),
            load_if_exists=True,
        )
    except (ImportError, ValueError) as exc:
        raise AbliterateError(f"cannot open search storage {storage_label(storage)} ({exc}); check --storage") from None
    found = study.user_attrs.get("key")
    if found is None:
        study.set_user_attr("key", key)
    elif found != key:
        raise AbliterateError(
            f"study '{name}' in {storage_label(storage)} was made for another model, prompts or settings; "
            "pass another --study name"
        )
    return study


def _judged(study: Any, probe: Probe, point: Point | None, key: str, tokens: int,
            on_judged: Callable[[], None] | None) -> tuple[float, float]:  # fmt: skip
    """A point's judged rates, from the study if an earlier run (or worker) judged it, else measured and stored."""
    found = study.user_attrs.get(key)
    if found is None:
        found = probe.judge(point, tokens)
        study.set_user_attr(key, list(found))
    if on_judged:
        on_judged()
    return float(found[0]), float(found[1])


def measured(study: Any) -> list[Scored]:
    """Every completed trial of the study, as measured."""
    optuna = require("optuna", "search", "the edit search")
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    # mypy cannot count *t.values (the study's three objectives: refusal, over-refusal, KL)
    return [
        Scored(t.number, Point.from_dict(t.user_attrs["point"]), *t.values, t.user_attrs["kl_bound"])  # type: ignore[call-arg]
        for t in done
    ]


def completed(study: Any) -> int:
    """How many trials the study has finished, every worker's counted."""
    optuna = require("optuna", "search", "the edit search")
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def optimize(
    study: Any, probe: Probe, space: Space, trials: int, timeout: float | None = None,
    on_trial: Callable[[Scored], None] | None = None, max_kl: float | None = None,
) -> None:  # fmt: skip
    """Run trials until the study holds `trials` completed ones (counting every worker's) or time runs out.

    With `max_kl` the sampler knows the KL budget: a trial whose KL upper bound exceeds it is infeasible
    (an Optuna constraint), so the sampler spends its trials on edits the choice may take.
    """
    optuna = require("optuna", "search", "the edit search")

    def objective(trial: Any) -> tuple[float, float, float]:
        point = space.suggest(trial)
        refusal, over, kl, bound = probe.measure(point)
        trial.set_user_attr("point", point.as_dict())
        trial.set_user_attr("kl_bound", bound)
        trial.set_user_attr("worker", WORKER)
        if max_kl is not None:
            trial.set_constraint("kl_bound", bound - max_kl)  # <= 0: within the budget
        if on_trial:
            on_trial(Scored(trial.number, point, refusal, over, kl, bound))
        return refusal, over, kl

    if not study.get_trials(deepcopy=False):
        for start in space.starts(probe.rank_layers(space))[:trials]:
            study.enqueue_trial(start)  # a new study begins with the plain edits of the best directions
    left = trials - completed(study)
    if left > 0:
        complete = (optuna.trial.TrialState.COMPLETE,)
        stop = optuna.study.MaxTrialsCallback(trials, states=complete)  # other workers' trials count too
        study.optimize(objective, n_trials=left, timeout=timeout, callbacks=[stop], gc_after_trial=False)


def result(
    study: Any, probe: Probe, threshold: float, storage: str, verify: int = 0, tokens: int = 100,
    on_judged: Callable[[], None] | None = None,
) -> SearchResult:  # fmt: skip
    """The front of everything the study measured, the `verify` best points within the budget judged on whole
    answers (cached in the study), and the point chosen by rule."""
    trials = measured(study)
    if not trials:
        raise AbliterateError("the search measured no trial; raise --trials or --search-minutes")
    front = pareto(trials)
    base = dict(probe.baseline)
    judged: dict[int, Any] = {}
    for s in within_budget(front, threshold)[:verify]:
        judged[s.trial] = _judged(study, probe, s.point, f"judged:{s.trial}:{tokens}", tokens, on_judged)
    if judged:
        base["judged_refusal"], base["judged_over_refusal"] = _judged(
            study, probe, None, f"judged:none:{tokens}", tokens, on_judged
        )
        front = [replace(s, judged_refusal=judged[s.trial][0], judged_over_refusal=judged[s.trial][1])
                 if s.trial in judged else s for s in front]  # fmt: skip
    chosen = choose(front, threshold)
    reason = (
        f"searched {len(trials)} edits ({len(front)} on the Pareto front); least refusal within the KL budget: "
        f"harmful validation P(refusal opening) {base['refusal']:.3f} -> {chosen.refusal:.3f}, benign "
        f"{base['over_refusal']:.3f} -> {chosen.over_refusal:.3f}, first-token KL {chosen.kl:.3g} (upper 95% bound "
        f"{chosen.kl_bound:.3g} <= {threshold:.3g})"
    )
    if chosen.judged_refusal is not None:
        reason += (
            f"; of the {len(judged)} best judged on whole {tokens}-token answers: refusal "
            f"{base['judged_refusal']:.2f} -> {chosen.judged_refusal:.2f}, over-refusal "
            f"{base['judged_over_refusal']:.2f} -> {chosen.judged_over_refusal:.2f}"
        )
    return SearchResult(trials, front, chosen, base, threshold, storage, study.study_name, reason, probe.refusal_tokens)
