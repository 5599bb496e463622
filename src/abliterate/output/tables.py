"""Terminal tables: the candidate directions, and the before/after metrics."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from abliterate.evaluation.metrics import Metrics
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
