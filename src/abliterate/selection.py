"""Score candidate directions with forward passes and pick the one that removes refusal cheapest."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from abliterate.architectures import Architecture
from abliterate.directions import Candidates
from abliterate.edit import EditParams, ablation, addition
from abliterate.errors import AbliterateError
from abliterate.judge import judge_many
from abliterate.model import answer_text, generate_ids, kl_divergence, last_token_logprobs
from abliterate.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefusalTokens:
    """First answer tokens that open this model's refusals, learned from its own answers."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    refusals_seen: int
    answers_seen: int
    precision: float  # share of sampled answers opening with these tokens that were refusals


@dataclass
class CandidateScore:
    """Effect of one candidate direction on the validation prompts (log-odds, KL in nats).

    refusal_ablated is measured with full ablation for every candidate; the search then walks the
    strength ladder for the most promising ones and keeps the strongest edit within the KL budget
    (refusal, kl, scale, start_layer), recording every step in trials.
    """

    position: int
    layer: int
    refusal_ablated: float  # mean refusal log-odds on harmful prompts, direction fully ablated
    refusal_induced: float | None = None  # mean refusal log-odds on harmless prompts with it added
    refusal: float | None = None  # at the chosen strength
    kl: float | None = None  # mean first-token KL(original || edited) on harmless prompts, chosen strength
    kl_bound: float | None = None  # kl plus 1.645 standard errors over those prompts: what the budget holds
    refused: int | None = None  # harmful validation prompts with refusal log-odds > 0, chosen strength
    scale: float = 1.0
    start_layer: int = 0
    eligible: bool = False
    trials: list = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)

    @property
    def params(self) -> EditParams:
        """The edit strength chosen for this candidate."""
        return EditParams(self.scale, self.start_layer)


# Adding a refusal direction must raise the harmless prompts' refusal log-odds by at least this much; a random
# model's directions move it by hundredths either way, and an edit chosen on that would be chosen on noise.
MIN_INDUCED = 0.1


def strength_ladder(n_layers: int) -> list[EditParams]:
    """Edits from strongest to gentlest: full ablation, then sparing the first third of the layers,
    then removing only part of the component there. Measured on Qwen2.5-0.5B, each step lowers
    harmless KL by a quarter to a half for a small loss in refusal removal."""
    start = n_layers // 3
    return [
        EditParams(1.0, 0),
        EditParams(1.0, start),
        EditParams(0.85, start),
        EditParams(0.7, start),
        EditParams(0.55, start),
    ]


def induction_ladder() -> list[EditParams]:
    """Refusal induction from strongest to gentlest: each writer's component along the direction is
    multiplied by 1 - scale (so scale -1 doubles it)."""
    return [EditParams(-3.0, 0), EditParams(-2.0, 0), EditParams(-1.0, 0), EditParams(-0.5, 0), EditParams(-0.25, 0)]


@dataclass
class Selection:
    """The chosen candidate, every score, and the baselines they compare with."""

    chosen: CandidateScore
    scores: list[CandidateScore]
    baseline_refusal_harmful: float
    baseline_refusal_harmless: float
    kl_threshold: float
    refusal_tokens: RefusalTokens
    reason: str
    baseline_refused: int | None = None  # harmful validation prompts with refusal log-odds > 0, unedited
    n_val: int | None = None  # harmful (and harmless) validation prompts


# One-sided 95% normal quantile: the budget holds for an upper bound on mean KL, not the sample mean.
Z_UPPER = 1.645
# Share of both harmful and harmless answers one first token may open before the score is meaningless.
MAX_SHARED_OPENING = 0.9


def find_refusal_tokens(
    model: nn.Module,
    tokenizer,
    harmful: list[str],
    harmless: list[str],
    batch_size: int,
    max_new_tokens: int = 24,
    min_precision: float = 0.75,
    min_answers: int = 8,
) -> RefusalTokens:
    """Generate short answers, judge them, and keep first generated tokens that mostly open refusals."""
    prompts = harmful + harmless
    generated = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size)
    answers = [answer_text(tokenizer, answer) for _, answer in generated]
    # The ids the model emitted: re-tokenizing the answer text differs with word-initial markers (SentencePiece).
    first_ids = [answer[0] if answer else None for _, answer in generated]
    _check_shared_opening(tokenizer, first_ids[: len(harmful)], first_ids[len(harmful) :], min_answers)
    labels = [v.label for v in judge_many(zip(prompts, answers))]
    opens_refusal = Counter(t for t, lab in zip(first_ids, labels) if lab == "refusal" and t is not None)
    opens_any = Counter(t for t in first_ids if t is not None)
    n_refusals = sum(opens_refusal.values())
    chosen = [t for t, n in opens_refusal.items() if n >= 2 and n / opens_any[t] >= min_precision]
    if not chosen and opens_refusal:
        # A model that rarely refuses: fall back to its most common refusal opening and say so.
        chosen = [opens_refusal.most_common(1)[0][0]]
        log.warning("few refusals to learn from; refusal score uses the most common refusal opening only")
    if not chosen:
        chosen = _fallback_tokens(tokenizer)
        log.warning("the model refused none of the sampled harmful prompts; refusal score uses the token 'I'")
    covered = sum(opens_any[t] for t in chosen)
    precision = sum(opens_refusal[t] for t in chosen) / covered if covered else 0.0
    chosen.sort(key=lambda t: -opens_refusal[t])
    return RefusalTokens(
        tuple(chosen), tuple(tokenizer.convert_ids_to_tokens(chosen)), n_refusals, len(answers), precision
    )


def _check_shared_opening(tokenizer, harmful: list[int | None], harmless: list[int | None], min_answers: int) -> None:
    """Stop when one token opens nearly every harmful and harmless answer: its probability says nothing of refusal."""
    if len(harmful) < min_answers or len(harmless) < min_answers:
        return  # too few answers to call a shared opening more than chance
    top, n_harmful = Counter(harmful).most_common(1)[0]
    n_harmless = harmless.count(top)
    if top is None or n_harmful < MAX_SHARED_OPENING * len(harmful) or n_harmless < MAX_SHARED_OPENING * len(harmless):
        return
    token = tokenizer.convert_ids_to_tokens(top)
    raise AbliterateError(
        f"{n_harmful} of {len(harmful)} harmful and {n_harmless} of {len(harmless)} harmless answers all open with "
        f"the token {token!r} (a reasoning block or fixed preamble?), so the first-token refusal score is meaningless; "
        "run without --thinking, or give a --system-prompt that makes the model answer directly"
    )


def _fallback_tokens(tokenizer) -> list[int]:
    return tokenizer("I", add_special_tokens=False).input_ids[:1]


def refusal_log_odds(logprobs: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """Per prompt: log p(refusal opening) - log p(anything else), from next-token log-probs."""
    log_p = torch.logsumexp(logprobs[:, list(ids)], dim=-1).clamp(max=-1e-6)
    return log_p - torch.log1p(-log_p.exp())


def kl_upper_bound(kl: torch.Tensor) -> float:
    """One-sided 95% upper bound on mean per-prompt KL: mean + 1.645 standard errors (the mean alone for one prompt)."""
    mean = kl.mean().item()
    if kl.numel() < 2:
        return mean
    return mean + Z_UPPER * kl.std().item() / math.sqrt(kl.numel())


def select_direction(
    model: nn.Module,
    tokenizer,
    arch: Architecture,
    candidates: Candidates,
    harmful_val: list[str],
    harmless_val: list[str],
    refusal_tokens: RefusalTokens,
    batch_size: int,
    max_kl: float = Settings.max_kl,
    kl_margin: float = Settings.kl_margin,
    skip_last_layers: float = Settings.skip_last_layers,
    top_k: int = Settings.top_k,
    induce: bool = False,
    layer: int | None = None,
    on_step: Callable[[str], None] | None = None,
    on_more: Callable[[int], None] | None = None,
) -> Selection:
    """Score every candidate by refusal under full ablation; then, best first, check that adding the
    direction induces refusal and search the strength ladder for the strongest edit whose validation
    KL upper bound is within max_kl * kl_margin and that lowers refusal (raises it under induce).

    The top_k are always searched; past them the walk goes on down the whole ranking until one
    qualifies (on_more announces each extra candidate's steps). The best qualifying edit wins; when
    none qualifies, AbliterateError says why: nothing unmeasured or of the wrong sign is returned.
    """
    ids = refusal_tokens.ids
    n_positions, n_layers = candidates.directions.shape[:2]
    base_harmful = last_token_logprobs(model, tokenizer, harmful_val, batch_size)
    base_harmless = last_token_logprobs(model, tokenizer, harmless_val, batch_size)
    harmful_odds = refusal_log_odds(base_harmful, ids)
    baseline_refusal = harmful_odds.mean().item()
    baseline_refused = int((harmful_odds > 0).sum())
    baseline_harmless = refusal_log_odds(base_harmless, ids).mean().item()
    threshold = max_kl * kl_margin

    model_layers = n_layers - 1  # candidates also exist after the last layer, where nothing can be added
    if layer is not None:
        if not 0 <= layer < model_layers:
            raise AbliterateError(f"--layer {layer} is out of range; this model has layers 0 to {model_layers - 1}")
        allowed = [layer]
    else:
        allowed = list(range(max(1, math.floor(model_layers * (1 - skip_last_layers)))))
    norms = candidates.diffs.norm(dim=-1)
    scores = []
    refused_ablated = {}
    for pos in range(n_positions):
        for lay in allowed:
            if norms[pos, lay] <= 1e-6 * norms.max():
                continue  # e.g. the embedding of a last token every prompt shares: no direction at all
            with ablation(model, arch, candidates.direction(pos, lay)):
                odds = refusal_log_odds(last_token_logprobs(model, tokenizer, harmful_val, batch_size), ids)
            scores.append(CandidateScore(pos, lay, odds.mean().item()))
            refused_ablated[pos, lay] = int((odds > 0).sum())
            if on_step:
                on_step(f"ablation pos {pos} layer {lay}")
    if not scores:
        raise AbliterateError(
            "the harmful and harmless training prompts give the same mean activations at every candidate layer, "
            "so there is no direction to remove; use different harmful and harmless prompt sets"
        )

    ranked = sorted(scores, key=lambda s: s.refusal_ablated)
    ladder = induction_ladder() if induce else strength_ladder(model_layers)
    for rank, score in enumerate(ranked):
        if rank >= top_k:
            if any(s.eligible for s in ranked[:rank]):
                break  # the top_k are searched in full; past them only until one qualifies
            if on_more:
                on_more(1 + len(ladder))
        direction = candidates.direction(score.position, score.layer)
        with addition(model, arch, candidates.diff(score.position, score.layer), score.layer):
            lp = last_token_logprobs(model, tokenizer, harmless_val, batch_size)
        score.refusal_induced = refusal_log_odds(lp, ids).mean().item()
        if on_step:
            on_step(f"addition pos {score.position} layer {score.layer}")
        if score.refusal_induced <= baseline_harmless + MIN_INDUCED:
            continue  # adding it does not make the model refuse: not the refusal direction
        for params in ladder:
            with ablation(model, arch, direction, params):
                kl = kl_divergence(base_harmless, last_token_logprobs(model, tokenizer, harmless_val, batch_size))
                if params == EditParams():
                    refusal, refused = score.refusal_ablated, refused_ablated[score.position, score.layer]
                else:
                    odds = refusal_log_odds(last_token_logprobs(model, tokenizer, harmful_val, batch_size), ids)
                    refusal, refused = odds.mean().item(), int((odds > 0).sum())
            score.refusal, score.refused = refusal, refused
            score.scale, score.start_layer = params.scale, params.start_layer
            score.kl, score.kl_bound = kl.mean().item(), kl_upper_bound(kl)
            score.trials.append(
                {"scale": params.scale, "start_layer": params.start_layer, "refusal": refusal, "refused": refused,
                 "kl": score.kl, "kl_bound": score.kl_bound}
            )  # fmt: skip
            if on_step:
                on_step(
                    f"pos {score.position} layer {score.layer} scale {params.scale} from layer {params.start_layer}"
                )
            helps = refusal > baseline_refusal if induce else refusal < baseline_refusal
            if score.kl_bound <= threshold and helps:
                score.eligible = True
                break

    n = len(harmful_val)

    # Removal wants the least refusal left; induction the most refusal gained.
    def order(s: CandidateScore) -> float:
        assert s.refusal is not None  # an eligible candidate was measured at its chosen strength
        return -s.refusal if induce else s.refusal

    eligible = sorted((s for s in ranked if s.eligible), key=order)
    if not eligible:
        raise AbliterateError(
            _why_none(
                ranked, induce, baseline_refused, n, baseline_refusal, baseline_harmless, threshold, max_kl, kl_margin
            )
        )
    chosen = eligible[0]
    if chosen.kl_bound is None or chosen.refusal is None or (chosen.scale < 0) != induce:
        raise AbliterateError(f"internal error: chosen edit (scale {chosen.scale}) unmeasured or of the wrong sign")
    searched = sum(s.refusal_induced is not None for s in ranked)
    goal = "highest" if induce else "lowest"
    reason = (
        f"{goal} refusal among the {len(eligible)} of {searched} searched candidates that induce refusal and pass "
        f"the KL budget: harmful validation refusal log-odds {baseline_refusal:+.2f} -> {chosen.refusal:+.2f} "
        f"({baseline_refused} -> {chosen.refused} of {n} prompts above 0); first-token KL on the {len(harmless_val)} "
        f"harmless validation prompts {chosen.kl:.3g}, upper 95% bound {chosen.kl_bound:.3g} <= budget "
        f"{threshold:.3g} (--max-kl {max_kl:g} x --kl-margin {kl_margin:g})"
    )
    if not induce and baseline_refused == 0:
        log.warning(f"the model refused 0 of {n} harmful validation prompts; the edit lowers an already low score")
    log.info(reason)
    return Selection(
        chosen, scores, baseline_refusal, baseline_harmless, threshold, refusal_tokens, reason, baseline_refused, n
    )


def _why_none(
    ranked: list[CandidateScore], induce: bool, refused: int, n: int, baseline_refusal: float,
    baseline_harmless: float, threshold: float, max_kl: float, kl_margin: float,
) -> str:  # fmt: skip
    """One line: why no candidate qualified, from what was measured, and what to try."""
    searched = [s for s in ranked if s.refusal_induced is not None]
    inducing = [
        s for s in searched if s.refusal_induced is not None and s.refusal_induced > baseline_harmless + MIN_INDUCED
    ]
    bounds = [t["kl_bound"] for s in inducing for t in s.trials]
    if not induce and refused == 0:
        return (
            f"the model refused 0 of {n} harmful validation prompts (refusal log-odds > 0 on the first answer "
            "token): there is no refusal to remove; use prompts it refuses or another model"
        )
    if not inducing:
        return (
            f"no candidate raises refusal on harmless prompts: adding any of the {len(searched)} candidate directions "
            f"leaves their refusal log-odds at or below the baseline {baseline_harmless:+.2f}, so none is a refusal "
            "direction; use more training prompts (--n-train) or harmful prompts the model refuses"
        )
    if min(bounds) > threshold:
        return (
            f"no candidate keeps validation KL <= {threshold:.3g} (--max-kl {max_kl:g} x --kl-margin {kl_margin:g}, "
            f"held by the upper 95% bound of the mean first-token KL on the harmless validation prompts); the "
            f"lowest bound measured is {min(bounds):.3g}; raise --max-kl, or add validation prompts (--n-val)"
        )
    if induce:
        return (
            f"no candidate edit within the KL budget raises refusal on the harmful validation prompts above the "
            f"baseline log-odds {baseline_refusal:+.2f}; raise --max-kl or use another model"
        )
    return (
        f"no candidate edit within the KL budget lowers refusal on the harmful validation prompts below the "
        f"baseline log-odds {baseline_refusal:+.2f} ({refused} of {n} refused); raise --max-kl, use prompts it "
        "refuses or another model"
    )
