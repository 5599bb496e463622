"""The run report: one self-contained report.html with its plots embedded, and the PNGs in report/.

Everything is drawn from the artifacts a run leaves on disk (abliteration.json,
directions.safetensors, evaluation.json), so `abliterate report RUN_DIR` re-renders any finished run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the Figure API renders with Agg and never touches a display
from matplotlib.ticker import MaxNLocator
from safetensors import SafetensorError
from safetensors.numpy import load_file

from abliterate.errors import AbliterateError
from abliterate.files import atomic_write_text, staging
from abliterate.output.record import RECORD, RunRecord, load_record

SAMPLES_PER_SET = 8


@dataclass
class RunArtifacts:
    """What a finished run folder holds, loaded."""

    record: RunRecord
    tensors: dict[str, np.ndarray]
    answers: dict | None  # evaluation.json; None for --no-eval runs

    @property
    def position(self) -> int:
        """The chosen direction's position from the end of the prompt."""
        return self.record.selection["position"]

    @property
    def induce(self) -> bool:
        """Whether the run strengthened refusal instead of removing it."""
        return self.record.induce


def load_run(run_dir: Path) -> RunArtifacts:
    """Read a run folder's record, directions and answers."""
    directions_path = run_dir / "directions.safetensors"
    if not (run_dir / RECORD).is_file() or not directions_path.is_file():
        raise AbliterateError(
            f"{run_dir} has no abliteration.json and directions.safetensors; pass the folder of a finished run"
        )
    try:
        tensors = load_file(str(directions_path))
        for key in ("direction", "candidate_directions", "harmful_means", "harmless_means"):
            tensors[key] = tensors[key].astype(np.float64)
        answers_path = run_dir / "evaluation.json"
        answers = json.loads(answers_path.read_text(encoding="utf-8")) if answers_path.is_file() else None
    except (json.JSONDecodeError, SafetensorError, KeyError, TypeError, OSError, ValueError) as exc:
        raise AbliterateError(f"{run_dir} holds a damaged run record ({exc}); rerun `abliterate run`") from None
    return RunArtifacts(load_record(run_dir), tensors, answers)


KL_AXIS = "first-token KL on harmless validation prompts (nats)"


def _line_plot(fig: Figure, ax, xlabel: str, ylabel: str) -> bytes:
    """Label the axes, add the legend and grid every plot of points and lines has, and render the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _layer_ticks(ax, n: int) -> None:
    """Layer axis: 0..L-1 are layer inputs, the last index is the output of the last layer."""
    step = max(1, n // 12)
    ticks = list(range(0, n - 1, step)) + [n - 1]
    ax.set_xticks(ticks, [str(t) for t in ticks[:-1]] + ["out"])


def plot_layer_scores(run: RunArtifacts) -> bytes | None:
    """Refusal log-odds with each candidate ablated (and induced, where measured) against its layer."""
    sel = run.record.selection
    if not sel["candidates"]:
        return None  # a searched edit scans no candidates one by one
    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot()
    positions = sorted({c["position"] for c in sel["candidates"]})
    for pos in positions:
        cands = sorted((c for c in sel["candidates"] if c["position"] == pos), key=lambda c: c["layer"])
        label = "harmful, direction ablated" + (f" (position {pos})" if len(positions) > 1 else "")
        ax.plot([c["layer"] for c in cands], [c["refusal_ablated"] for c in cands], "o-", ms=4, label=label)
    induced = [c for c in sel["candidates"] if c["refusal_induced"] is not None]
    if induced:
        ax.plot([c["layer"] for c in induced], [c["refusal_induced"] for c in induced], "^", color="tab:red",
                label="harmless, direction added")  # fmt: skip
    base = sel["baseline_refusal_log_odds"]
    ax.axhline(base["harmful"], ls="--", color="grey", lw=1, label="harmful, no edit")
    ax.axhline(base["harmless"], ls=":", color="grey", lw=1, label="harmless, no edit")
    chosen = _chosen(run)
    if chosen:
        ax.plot(chosen["layer"], chosen["refusal_ablated"], "*", ms=16, color="gold", mec="black", label="chosen")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _line_plot(fig, ax, "layer the direction was taken from", "refusal log-odds (validation prompts)")


def plot_layer_cosine(run: RunArtifacts) -> bytes:
    """Cosine similarity between the directions of every pair of layers, at the chosen position."""
    dirs = run.tensors["candidate_directions"][run.position]
    norms = np.linalg.norm(dirs, axis=-1, keepdims=True)
    unit = dirs / np.where(norms > 0, norms, np.nan)  # a layer with no direction shows blank, not 0
    n = len(unit)
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    image = ax.imshow(unit @ unit.T, cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    layer = run.record.selection["layer"]
    ax.axhline(layer, color="black", lw=0.8, ls="--")
    ax.axvline(layer, color="black", lw=0.8, ls="--")
    _layer_ticks(ax, n)
    ax.set_yticks(ax.get_xticks(), [t.get_text() for t in ax.get_xticklabels()])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    return _png(fig)


def projections(run: RunArtifacts) -> tuple[np.ndarray, np.ndarray]:
    """Harmful and harmless mean activations projected on the chosen direction, per layer."""
    d = run.tensors["direction"]
    d = d / np.linalg.norm(d)
    pos = run.position
    return run.tensors["harmful_means"][pos] @ d, run.tensors["harmless_means"][pos] @ d


def plot_projections(run: RunArtifacts) -> bytes:
    """The projections of the two means on the chosen direction, layer by layer."""
    harmful, harmless = projections(run)
    layers = np.arange(len(harmful))
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    ax.plot(layers, harmful, "o-", ms=4, color="tab:red", label="harmful prompts (mean)")
    ax.plot(layers, harmless, "o-", ms=4, color="tab:blue", label="harmless prompts (mean)")
    ax.axvline(run.record.selection["layer"], color="black", lw=0.8, ls="--", label="direction's layer")
    _layer_ticks(ax, len(layers))
    return _line_plot(fig, ax, "residual stream at the input of layer", "projection on the chosen direction")


def search_points(run: RunArtifacts) -> list[dict]:
    """Every strength tried by the search: candidate, scale, start layer, refusal and KL."""
    return [
        {"layer": c["layer"], "position": c["position"], **t}
        for c in run.record.selection["candidates"]
        for t in c.get("trials", [])
    ]


def pareto_front(points: list[dict], induce: bool) -> list[dict]:
    """The tried edits no other edit beats on both KL (lower) and refusal (lower; higher when inducing)."""
    sign = -1 if induce else 1
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p["kl"], sign * p["refusal"])):
        if sign * p["refusal"] < best:
            front.append(p)
            best = sign * p["refusal"]
    return front


def plot_search_front(run: RunArtifacts) -> bytes | None:
    """The searched edits' Pareto front: refusal against KL, coloured by over-refusal, with the budget."""
    found = run.record.selection.get("search")
    if not found:
        return None
    front = found["front"]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    dots = ax.scatter([p["kl"] for p in front], [p["refusal"] for p in front], c=[p["over_refusal"] for p in front],
                      cmap="viridis", s=28)  # fmt: skip
    fig.colorbar(dots, ax=ax, label="over-refusal, benign validation prompts")
    chosen = next((p for p in front if p["trial"] == found["chosen"]), None)
    if chosen:
        ax.plot([chosen["kl"]], [chosen["refusal"]], "o", ms=14, mfc="none", mec="tab:red", label="chosen")
    ax.axvline(found["kl_threshold"], color="tab:red", ls="--", lw=1, label="KL budget (its upper bound is held)")
    ax.axhline(found["baseline"]["refusal"], color="grey", ls=":", lw=1, label="refusal, no edit")
    return _line_plot(fig, ax, KL_AXIS, "P(refusal opening), harmful validation prompts")


def plot_pareto(run: RunArtifacts) -> bytes | None:
    """Refusal against KL for every strength the search tried, with the front and the budget."""
    points = search_points(run)
    if not points:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for key in sorted({(p["position"], p["layer"]) for p in points}):
        mine = [p for p in points if (p["position"], p["layer"]) == key]
        ax.plot([p["kl"] for p in mine], [p["refusal"] for p in mine], "o", ms=5, alpha=0.7,
                label=f"layer {key[1]}" + (f", position {key[0]}" if key[0] else ""))  # fmt: skip
    front = pareto_front(points, run.induce)
    ax.plot([p["kl"] for p in front], [p["refusal"] for p in front], "-", color="black", lw=1, label="Pareto front")
    ax.axvline(run.record.selection["kl_threshold"], color="tab:red", ls="--", lw=1, label="KL budget")
    chosen = _chosen(run)
    if chosen and chosen.get("kl") is not None:
        ax.plot(chosen["kl"], chosen["refusal"], "*", ms=16, color="gold", mec="black", label="chosen")
    kls = [p["kl"] for p in points]
    if min(kls) > 0 and max(kls) / min(kls) > 10:
        ax.set_xscale("log")
    return _line_plot(fig, ax, KL_AXIS, "refusal log-odds, harmful validation prompts")


def plot_categories(run: RunArtifacts) -> bytes | None:
    """Refusal (harmful) and over-refusal (benign) per category, before and after, with 95% intervals."""
    metrics = run.record.metrics
    titles = {"harmful_refusal": "refusal, harmful prompts", "benign_refusal": "over-refusal, benign prompts"}
    panels = [(metrics.rates[k], t) for k, t in titles.items() if k in metrics.rates] if metrics else []
    if not panels:
        return None
    rows = max(len(change.by_category) for change, _ in panels)
    fig = Figure(figsize=(10, 1.2 + 0.45 * rows))
    for i, (change, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        cats = list(change.by_category)
        y = np.arange(len(cats))
        for offset, when, colour in ((-0.2, 0, "tab:grey"), (0.2, 1, "tab:orange")):
            measured = [change.by_category[c][when] for c in cats]
            rates = [r for r in measured if r is not None]
            if len(rates) < len(measured):
                continue  # a model measured alone has no before
            values = np.array([r.value for r in rates]) * 100
            err = np.array([[v - 100 * r.low, 100 * r.high - v] for v, r in zip(values, rates)]).T
            err = err.clip(min=0)  # rounding can put k/n a hair outside its Wilson interval at 0 or n
            ax.barh(y + offset, values, height=0.4, xerr=err, color=colour, capsize=2,
                    label="after" if when else "before")  # fmt: skip
        ax.set_yticks(y, cats, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of answers")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


PLOTS = {
    "layer_scores": (plot_layer_scores, "Candidate scores by layer",
                     "Mean refusal log-odds on the harmful validation prompts with each candidate direction fully "
                     "ablated (lower removes more refusal), and on harmless prompts with the direction added "
                     "(higher induces more refusal; measured for the candidates the strength search considered)."),
    "layer_cosine": (plot_layer_cosine, "Cosine similarity between layers' directions",
                     "Difference-of-means direction of every layer against every other, at the chosen position; "
                     "the dashed lines mark the chosen layer."),
    "projections": (plot_projections, "Harmful and harmless activations along the chosen direction",
                    "Projection of the mean residual activation of the harmful and of the harmless training prompts "
                    "on the chosen direction, at the input of every layer and after the last. The run keeps running "
                    "means only, not per-prompt activations, so the spread across prompts is not shown."),
    "pareto": (plot_pareto, "Strength search: refusal against KL",
               "Every edit strength the search tried (scale, first edited layer) for each searched candidate; the "
               "line joins the edits no other tried edit beats on both refusal and KL."),
    "search_front": (plot_search_front, "Edit search: the Pareto front",
                     "Every searched edit no other beats on refusal, over-refusal and KL at once (validation "
                     "prompts), with the KL budget; the chosen edit is circled."),
    "refusal_by_category": (plot_categories, "Refusal before and after, by category",
                            "Share of held-out answers judged refusals, per prompt category, with 95% Wilson "
                            "intervals."),
}  # fmt: skip


def render_plots(run: RunArtifacts) -> dict[str, bytes]:
    """Every plot the run's artifacts allow, as PNG bytes by name."""
    pngs = {}
    for name, (draw, _, _) in PLOTS.items():
        png = draw(run)
        if png:
            pngs[name] = png
    return pngs


def _chosen(run: RunArtifacts) -> dict | None:
    sel = run.record.selection
    for c in sel["candidates"]:
        if c["position"] == sel["position"] and c["layer"] == sel["layer"]:
            return c
    return None


def pick_samples(rows: list[dict], count: int = SAMPLES_PER_SET) -> list[dict]:
    """Answers whose label changed first, then the rest, in file order (deterministic)."""
    changed = [r for r in rows if r["before_label"] != r["after_label"]]
    return (changed + [r for r in rows if r["before_label"] == r["after_label"]])[:count]


def _e(value) -> str:
    return html.escape(str(value))


def _table(header: tuple[str, ...], rows: list[tuple], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; max-width: 800px; }
table.samples td { width: 33%; }
table.samples pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 0.85em; }
.label { font-size: 0.75em; padding: 0 0.4em; border-radius: 3px; background: #eee; }
.label.refusal { background: #fdd; } .label.compliance { background: #dfd; } .label.degenerate { background: #ffd; }
"""


def render_html(run: RunArtifacts, pngs: dict[str, bytes]) -> str:
    """The page: summary and metrics, plots as data URIs, per-category table, sample answers."""
    rec, sel, edit = run.record, run.record.selection, run.record.edit
    name = rec.model.base_model or rec.model.spec
    verb = "strengthened" if run.induce else "removed"
    parts = [
        f"<h1>abliterate report: {_e(name)}</h1>",
        f"<p>Refusal {_e(rec.direction_source)} from the end of the "
        f"prompt; {verb}: {_e(edit.params.describe())}. {_e(sel['reason'])}."
        f"</p><p>Model <code>{_e(rec.model.spec)}</code>, seed {_e(rec.seed)}, run {_e(rec.created)} "
        f"with abliterate {_e(rec.abliterate_version)}.</p>",
        "<h2>Before and after</h2>",
    ]
    metrics = rec.metrics
    if metrics:
        rows = [tuple(_e(c) for c in row) for row in metrics.rows()]
        parts.append(_table(metrics.header("original", "edited"), rows, "metrics"))
        parts.append("<p>Rates over held-out answers with 95% Wilson intervals; p is an exact McNemar test on the "
                     "same prompts; KL with a bootstrap interval.</p>")  # fmt: skip
    else:
        parts.append("<p>Not evaluated (the run used <code>--no-eval</code>).</p>")
    parts.append("<h2>Plots</h2>")
    for key, (_, title, caption) in PLOTS.items():
        if key not in pngs:
            continue
        data = base64.b64encode(pngs[key]).decode("ascii")
        parts.append(f'<figure><h3>{_e(title)}</h3><img id="plot-{key}" alt="{_e(title)}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>')  # fmt: skip
    if "pareto" not in pngs and "search_front" not in pngs:
        parts.append("<p>No strength search ran (no candidate passed the checks that start it).</p>")
    if metrics:
        parts.append("<h2>By category</h2>")
        for key, title in (("harmful_refusal", "Refusal, harmful prompts"),
                           ("benign_refusal", "Over-refusal, benign prompts")):  # fmt: skip
            rows = [tuple(_e(c) for c in row) for row in metrics.rates[key].category_rows()]
            parts += [f"<h3>{title}</h3>", _table(("category", "n", "original", "edited"), rows, "categories")]
    if run.answers:
        parts.append("<h2>Sample answers</h2><p>Greedy answers to held-out prompts, answers whose label changed "
                     "first; <code>evaluation.json</code> holds all of them.</p>")  # fmt: skip
        for key, title in (("harmful", "Harmful prompts"), ("benign", "Benign prompts with alarming words")):
            rows = [
                (_e(r["prompt"]) + f"<br><small>{_e(r.get('category', ''))}</small>",
                 _answer(r["before"], r["before_label"]), _answer(r["after"], r["after_label"]))
                for r in pick_samples(run.answers.get(key, []))
            ]  # fmt: skip
            parts += [f"<h3>{title}</h3>", _table(("prompt", "original", "edited"), rows, "samples")]
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>abliterate report: {_e(name)}</title>'
        f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def _answer(text: str, label: str) -> str:
    return f'<span class="label {_e(label)}">{_e(label)}</span><pre>{_e(text)}</pre>'


def write_report(run_dir: Path) -> Path:
    """Render report.html and report/*.png into a run folder (each replaced atomically); return the page."""
    run = load_run(run_dir)
    pngs = render_plots(run)
    with staging(run_dir / "report", force=True, kind="report") as tmp:
        for name, data in pngs.items():
            (tmp / f"{name}.png").write_bytes(data)
    page = run_dir / "report.html"
    atomic_write_text(page, render_html(run, pngs))
    page.chmod(0o644)  # like the run's other files, not mkstemp's private mode
    return page
