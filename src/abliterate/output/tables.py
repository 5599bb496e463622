"""Human-readable output of a run: the candidate table and the before/after table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from abliterate.selection import Selection

LABELS = {
    "harmful_refusal": "Refusal, harmful test prompts",
    "harmful_degenerate": "Degenerate, harmful test prompts",
    "benign_refusal": "Over-refusal, benign alarming prompts",
    "benign_degenerate": "Degenerate, benign alarming prompts",
}


def _pct(rate: dict) -> str:
    return f"{100 * rate['value']:.1f}% [{100 * rate['low']:.0f}-{100 * rate['high']:.0f}] ({rate['k']}/{rate['n']})"


def print_candidates(console: Console, selection: Selection, limit: int = 12) -> None:
    """The candidates measured in full, best ablated refusal first, and the choice."""
    table = Table(title="candidate directions (validation; refusal = log-odds of the refusal openings)")
    # ablated: refusal with the direction fully removed; induced: refusal on harmless prompts with it
    # added; scale/from/refusal/KL: the strongest edit within the KL budget found by the search.
    for col in ("pos", "layer", "ablated", "induced", "scale", "from", "refusal", "KL", ""):
        table.add_column(col, justify="right")
    ranked = sorted(selection.scores, key=lambda s: s.refusal_ablated)[:limit]
    for s in ranked:
        mark = "[bold green]chosen[/]" if s is selection.chosen else ("ok" if s.eligible else "")
        searched = s.refusal is not None
        table.add_row(
            str(s.position),
            str(s.layer),
            f"{s.refusal_ablated:+.2f}",
            "" if s.refusal_induced is None else f"{s.refusal_induced:+.2f}",
            f"{s.scale:g}" if searched else "",
            str(s.start_layer) if searched else "",
            f"{s.refusal:+.2f}" if searched else "",
            f"{s.kl:.4f}" if searched else "",
            mark,
        )
    console.print(table)
    console.print(
        f"baseline refusal log-odds: harmful {selection.baseline_refusal_harmful:+.2f}, "
        f"harmless {selection.baseline_refusal_harmless:+.2f}; {selection.reason}"
    )


def metrics_rows(metrics: dict) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, paired p) rows shared by the terminal table and the model card."""
    rows = []
    for key, name in LABELS.items():
        m = metrics[key]
        rows.append((name, _pct(m["before"]), _pct(m["after"]), f"{m['p_value']:.3g}"))
    kl_rows = (
        ("kl_first_token_harmless", "First-token KL, harmless test prompts"),
        ("kl_answer_harmless", "Per-token KL on the original's harmless answers"),
    )
    for key, name in kl_rows:
        if kl := metrics.get(key):
            rows.append((name, "0", f"{kl['value']:.4f} [{kl['low']:.4f}-{kl['high']:.4f}]", ""))
    ppl_rows = (
        ("perplexity_harmless_text", "Perplexity, plain harmless text"),
        ("perplexity_original_answers", "Perplexity of the original's harmless answers"),
    )
    for key, name in ppl_rows:
        if ppl := metrics.get(key):
            rows.append((name, _ppl(ppl["before"]), _ppl(ppl["after"]), ""))
    return rows


def _ppl(m: dict) -> str:
    return f"{m['value']:.2f} [{m['low']:.2f}-{m['high']:.2f}]"


def print_metrics(console: Console, metrics: dict) -> None:
    """Before/after table with 95% intervals and McNemar p-values."""
    table = Table(title="before / after (95% intervals; p: exact McNemar on the same prompts)")
    for col in ("metric", "before", "after", "p"):
        table.add_column(col)
    for row in metrics_rows(metrics):
        table.add_row(*row)
    console.print(table)
