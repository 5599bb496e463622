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
        f"# {name}, {'refusal strengthened' if induced else 'abliterated'}",
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
    if rec.metrics:
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
        f"- direction from layer {sel['layer']}, position {sel['position']}; {sel['reason']}",
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
