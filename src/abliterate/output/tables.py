"""Terminal tables: the candidate directions, the searched front, and the before/after metrics."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from abliterate.evaluation.metrics import Metrics
from abliterate.search import SearchResult
from abliterate.selection import Selection


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


def front_rows(found: SearchResult) -> list[tuple[str, ...]]:
    """One row per edit on the Pareto front, lowest KL first: what it does and what it costs."""
    rows: list[tuple[str, ...]] = []
    for s in found.front:
        p = s.point.params
        prof = lambda q: f"{q.peak:.2f}@{q.center:.1f}±{q.width:.1f}" if q else "-"  # noqa: E731
        rows.append((
            str(s.trial), f"{s.point.layer:.2f}", prof(p.attention), prof(p.mlp), "on" if p.embedding_scale else "off",
            f"{s.refusal:.3f}", f"{s.over_refusal:.3f}", f"{s.kl:.4f}", f"{s.kl_bound:.4f}",
            "" if s.judged_refusal is None else f"{s.judged_refusal:.2f} / {s.judged_over_refusal:.2f}",
            "[bold green]chosen[/]" if s is found.chosen else ("ok" if s.kl_bound <= found.kl_threshold else ""),
        ))  # fmt: skip
    return rows


FRONT_HEADER = ("trial", "layer", "attention", "mlp", "emb", "refusal", "over-refusal", "KL", "KL bound", "judged", "")


def print_front(console: Console, found: SearchResult) -> None:
    """The searched Pareto front (validation; refusal = mean P(refusal opening)) and the choice."""
    table = Table(title=f"Pareto front of {len(found.trials)} searched edits (validation prompts; strength "
                        "peak@layer±width per writer kind)")  # fmt: skip
    for col in FRONT_HEADER:
        table.add_column(col, justify="right")
    for row in front_rows(found):
        table.add_row(*row)
    console.print(table)
    base = found.baseline
    judged = (
        f" (judged: {base['judged_refusal']:.2f} / {base['judged_over_refusal']:.2f})"
        if "judged_refusal" in base
        else ""
    )
    console.print(
        f"no edit: refusal {base['refusal']:.3f}, over-refusal {base['over_refusal']:.3f}{judged}; {found.reason}"
    )


def markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A Markdown table's lines: the model card, `evaluate`'s report and `report --markdown` print with it."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def print_metrics(console: Console, metrics: Metrics, before: str = "before", after: str = "after") -> None:
    """The before/after table (or one model's numbers) with 95% intervals and McNemar p-values."""
    title = "95% intervals" + ("; p: exact McNemar on the same prompts" if metrics.paired else "")
    table = Table(title=f"{before} / {after} ({title})" if metrics.paired else f"{after} ({title})")
    for col in metrics.header(before, after):
        table.add_column(col)
    for row in metrics.rows():
        table.add_row(*row)
    console.print(table)
