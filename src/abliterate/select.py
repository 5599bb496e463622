"""Score candidate directions with forward passes and pick the one that removes refusal cheapest."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .architectures import Architecture
from .directions import Candidates
from .edit import ablation, addition
from .errors import AbliterateError
from .judge import judge
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
    """Effect of one candidate direction on the validation prompts (log-odds, KL in nats)."""

    position: int
    layer: int
    refusal_ablated: float  # mean refusal log-odds on harmful prompts with the direction ablated
    refusal_induced: float | None = None  # mean refusal log-odds on harmless prompts with it added
    kl: float | None = None  # mean first-token KL(original || ablated) on harmless prompts
    eligible: bool = False

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


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
    labels = [judge(p, a).label for p, a in zip(prompts, answers)]
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
    min_evaluated: int = 6,
    max_evaluated: int = 16,
    layer: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> Selection:
    """Score candidates: ablated refusal for all, then KL and induced refusal in order of promise.

    A candidate is eligible when adding it makes harmless prompts more refusal-prone than they
    were and its validation KL is under max_kl * kl_margin (held-out KL tends to run higher).
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
    evaluated = 0
    for score in ranked:
        if evaluated >= max_evaluated or (evaluated >= min_evaluated and any(s.eligible for s in scores)):
            break
        with ablation(model, arch, candidates.direction(score.position, score.layer)):
            lp = last_token_logprobs(model, tokenizer, harmless_val, batch_size)
        score.kl = kl_divergence(base_harmless, lp).mean().item()
        with addition(model, arch, candidates.diff(score.position, score.layer), score.layer):
            lp = last_token_logprobs(model, tokenizer, harmless_val, batch_size)
        score.refusal_induced = refusal_log_odds(lp, ids).mean().item()
        score.eligible = score.kl <= threshold and score.refusal_induced > baseline_harmless
        evaluated += 1
        if on_step:
            on_step(f"KL and induction pos {score.position} layer {score.layer}")

    eligible = [s for s in ranked if s.eligible]
    if eligible:
        chosen = eligible[0]
        reason = f"lowest ablated refusal among candidates with KL <= {threshold:.3g} that induce refusal"
    else:
        measured = [s for s in ranked if s.kl is not None]
        chosen = min(measured, key=lambda s: s.kl)
        reason = f"no candidate met KL <= {threshold:.3g} and induced refusal; took the lowest-KL one measured"
        log.warning(reason)
    return Selection(chosen, scores, baseline_refusal, baseline_harmless, threshold, refusal_tokens, reason)
