"""Score candidate directions with forward passes and pick the one that removes refusal cheapest."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .architectures import Architecture
from .directions import Candidates
from .edit import EditParams, ablation, addition
from .errors import AbliterateError
from .judge import judge_many
from .model import generate, kl_divergence, last_token_logprobs

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


def find_refusal_tokens(
    model: nn.Module,
    tokenizer,
    harmful: list[str],
    harmless: list[str],
    batch_size: int,
    max_new_tokens: int = 24,
    min_precision: float = 0.75,
) -> RefusalTokens:
    """Generate short answers, judge them, and keep first tokens that mostly open refusals."""
    answers = generate(model, tokenizer, harmful + harmless, max_new_tokens, batch_size)
    prompts = harmful + harmless
    first_ids = []
    for prompt, answer in zip(prompts, answers):
        ids = tokenizer(prompt + answer, add_special_tokens=False).input_ids
        start = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        first_ids.append(ids[start] if start < len(ids) else None)
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


def _fallback_tokens(tokenizer) -> list[int]:
    return tokenizer("I", add_special_tokens=False).input_ids[:1]


def refusal_log_odds(logprobs: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """Per prompt: log p(refusal opening) - log p(anything else), from next-token log-probs."""
    log_p = torch.logsumexp(logprobs[:, list(ids)], dim=-1).clamp(max=-1e-6)
    return log_p - torch.log1p(-log_p.exp())


def select_direction(
    model: nn.Module,
    tokenizer,
    arch: Architecture,
    candidates: Candidates,
    harmful_val: list[str],
    harmless_val: list[str],
    refusal_tokens: RefusalTokens,
    batch_size: int,
    max_kl: float = 0.1,
    kl_margin: float = 0.5,
    skip_last_layers: float = 0.2,
    top_k: int = 4,
    induce: bool = False,
    layer: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> Selection:
    """Score every candidate by refusal under full ablation; then, for the top_k, check that adding
    the direction induces refusal and search the strength ladder for the strongest edit whose
    validation KL is under max_kl * kl_margin (held-out KL tends to run higher). The lowest
    refusal among those wins.
    """
    ids = refusal_tokens.ids
    n_positions, n_layers = candidates.directions.shape[:2]
    base_harmful = last_token_logprobs(model, tokenizer, harmful_val, batch_size)
    base_harmless = last_token_logprobs(model, tokenizer, harmless_val, batch_size)
    baseline_refusal = refusal_log_odds(base_harmful, ids).mean().item()
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
    for pos in range(n_positions):
        for lay in allowed:
            if norms[pos, lay] <= 1e-6 * norms.max():
                continue  # e.g. the embedding of a last token every prompt shares: no direction at all
            with ablation(model, arch, candidates.direction(pos, lay)):
                lp = last_token_logprobs(model, tokenizer, harmful_val, batch_size)
            scores.append(CandidateScore(pos, lay, refusal_log_odds(lp, ids).mean().item()))
            if on_step:
                on_step(f"ablation pos {pos} layer {lay}")

    ranked = sorted(scores, key=lambda s: s.refusal_ablated)
    ladder = induction_ladder() if induce else strength_ladder(model_layers)
    for score in ranked[:top_k]:
        direction = candidates.direction(score.position, score.layer)
        with addition(model, arch, candidates.diff(score.position, score.layer), score.layer):
            lp = last_token_logprobs(model, tokenizer, harmless_val, batch_size)
        score.refusal_induced = refusal_log_odds(lp, ids).mean().item()
        if score.refusal_induced <= baseline_harmless:
            continue  # adding it does not make the model refuse: not the refusal direction
        for params in ladder:
            with ablation(model, arch, direction, params):
                kl = kl_divergence(base_harmless, last_token_logprobs(model, tokenizer, harmless_val, batch_size))
                if params == EditParams():
                    refusal = score.refusal_ablated
                else:
                    refusal = refusal_log_odds(last_token_logprobs(model, tokenizer, harmful_val, batch_size), ids)
                    refusal = refusal.mean().item()
            score.refusal, score.kl = refusal, kl.mean().item()
            score.scale, score.start_layer = params.scale, params.start_layer
            score.trials.append(
                {"scale": params.scale, "start_layer": params.start_layer, "refusal": refusal, "kl": score.kl}
            )
            if on_step:
                on_step(
                    f"pos {score.position} layer {score.layer} scale {params.scale} from layer {params.start_layer}"
                )
            if score.kl <= threshold:
                score.eligible = True
                break

    # Removal wants the least refusal left; induction the most refusal gained.
    eligible = sorted((s for s in ranked if s.eligible), key=lambda s: -s.refusal if induce else s.refusal)
    if eligible:
        chosen = eligible[0]
        goal = "highest" if induce else "lowest"
        reason = f"{goal} refusal among candidates that induce refusal, at the strongest edit with validation KL <= {threshold:.3g}"
    else:
        measured = [s for s in ranked if s.kl is not None] or ranked[:1]
        chosen = min(measured, key=lambda s: s.kl if s.kl is not None else float("inf"))
        reason = f"no candidate reached validation KL <= {threshold:.3g}; took the lowest-KL edit measured"
        log.warning(reason)
    return Selection(chosen, scores, baseline_refusal, baseline_harmless, threshold, refusal_tokens, reason)
