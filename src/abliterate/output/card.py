"""The model card (README.md) of a saved model, from its run record."""

from __future__ import annotations

from abliterate.output.record import RunRecord
from abliterate.output.tables import markdown


def model_card(rec: RunRecord) -> str:
    """README.md with YAML front matter, the metrics table, parameters and limitations."""
    model, sel, edit = rec.model, rec.selection, rec.edit
    induced = rec.induce
    name = model.base_model or model.spec
    front = ["---"]
    if model.base_model:
        front += [f"base_model: {model.base_model}", "base_model_relation: finetune"]
    if model.license:
        front.append(f"license: {model.license}")
    front += [
        "library_name: transformers",
        "tags:",
        "  - refusal-induced" if induced else "  - abliterated",
        "  - refusal-direction",
        "  - abliterate",
        "---",
    ]
    lines = front + [
        "",
        f"# {name}, {'refusal strengthened' if induced else 'abliterated'}{', then healed' if rec.heal else ''}",
        "",
        f"The refusal direction of `{name}` (difference of mean residual activations "
        f"on harmful and harmless prompts, layer {sel['layer']}, position {sel['position']} from the end of the prompt) "
        f"was {'amplified in' if induced else 'projected out of'} every matrix that writes to the residual stream, by "
        f"[abliterate](https://pypi.org/project/abliterate/) {rec.abliterate_version}.",
        "",
        "## Evaluation",
        "",
    ]
    if rec.applied_to:
        lines += [f"This edit was re-applied to `{rec.applied_to['source']}` with `abliterate apply`; the numbers below "
                  "were measured by the run that made it.", ""]  # fmt: skip
    if rec.heal:
        lines += _healed(rec.heal)
    elif rec.metrics:
        lines += markdown(rec.metrics.header("original", "abliterated"), rec.metrics.rows())
        lines += [
            "",
            "Rates over all answers with 95% Wilson intervals; p is an exact McNemar test on the same prompts; "
            f"greedy answers of {rec.settings['max_new_tokens']} new tokens judged whole by abliterate's judge.",
        ]
    else:
        lines.append("Not evaluated (`--no-eval`).")
    lines += [
        "",
        "## Parameters",
        "",
        f"- {rec.direction_source}; {sel['reason']}",
        f"- edit: {edit.params.describe()}",
        f"- refusal openings learned from the model: {rec.refusal_tokens.get('tokens', [])}",
        f"- prompts: train {rec.settings['n_train']}, validation {rec.settings['n_val']}, "
        f"test {rec.settings['n_test']} of each kind; seed {rec.seed}",
        "",
        "## Reproduce",
        "",
        "```",
        _reproduce(rec),
        "```",
        "",
        "`abliteration.json` holds every setting, prompt-set hashes and package versions; "
        "`directions.safetensors` holds the direction.",
        "",
        "## Limitations",
        "",
        "- Refusal is judged by abliterate's judge (rules, then a small classifier over sentence embeddings; "
        "`abliterate judge-accuracy --split test` measures it against held-out human labels). It misses some soft "
        "refusals, mostly answers to a safer question than the one asked, and flags a few compliant answers; "
        "`evaluation.json` holds every answer so you can check.",
        "- KL is measured on harmless prompts over the first tokens of the original model's answers; damage "
        "that shows later in long answers, or only on other kinds of input, is not in those numbers.",
        "- Strengthening refusal makes the model refuse more of everything that sounds dangerous, benign "
        "requests included; see the over-refusal row."
        if induced
        else "- Removing refusal removes a safeguard. The model will answer requests it used to decline.",
        "",
    ]
    return "\n".join(lines)


HEAL_ROWS = {  # the heal section's measured rows, in the card's words
    "kl_per_token": "per-token KL to the original (harmless validation prompts)",
    "kl_first_token": "first-token KL to the original",
    "refusal_log_odds": "refusal log-odds (harmful validation prompts)",
    "judged_refusal": "judged refusal (harmful validation prompts)",
}


def _healed(heal: dict) -> list[str]:
    """The heal's three columns (original, edited, healed) and what it did."""
    cell = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    rows = [(label, *(cell(heal["measured"][key].get(c)) for c in ("original", "edited", "healed")))
            for key, label in HEAL_ROWS.items() if key in heal["measured"]]  # fmt: skip
    held = "Its loss also held the first answer token after harmful prompts to the edited model's"
    anchor = f"{held} ({heal['anchor']}). " if heal.get("anchor") else ""
    return [
        f"After the edit, `abliterate heal` trained a rank-{heal['settings']['rank']} LoRA on the "
        f"{heal['writers']} residual-stream writers for {heal['steps']} steps (kept: step {heal['best_step']}; "
        f"stopped: {heal['stopped']}) to pull the model's next-token distributions back toward the original's on "
        f"harmless prompts and the original's own answers to them. {heal['constraint']} (largest update along it: "
        f"{heal['max_update_along_direction']:.2g}). " + anchor + f"It is {heal['note']}.",
        "",
        *markdown(("", "original", "abliterated", "healed"), rows),
        "",
        f"Measured on {heal['measured_on']}. `abliterate evaluate` of this folder against the original measures the "
        "run's held-out test prompts.",
    ]


def _reproduce(rec: RunRecord) -> str:
    """The command that makes this edit again."""
    sel, spec, seed = rec.selection, rec.model.spec, rec.seed
    if "search" in sel:
        trials = rec.settings.get("trials", sel["search"]["trials"])
        return f"abliterate run {spec} --out OUT --search --trials {trials} --seed {seed}"
    return (
        f"abliterate run {spec} --out OUT --layer {sel['layer']} --seed {seed}"
        + (" --induce" if rec.induce else "")
        + (" --norm-preserving" if rec.edit.norm_preserving else "")
    )
