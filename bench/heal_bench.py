"""Benchmark: what `abliterate heal` buys, as original / edited / healed columns on the run's held-out test prompts.

Measures the original once (its greedy harmless answers are the KL reference), then the run's
edited model and the healed model against it, exactly as `abliterate evaluate` does, and prints
the first-token and per-token KL, refusal and over-refusal of each with the healed/edited ratios:
  .venv/bin/python bench/heal_bench.py RUN_DIR HEALED_DIR [--n-test 64] [--max-new-tokens 96]
--forward-only skips the judged answers (the slow part on a CPU): first-token KL on every harmless
test prompt, per-token KL along the original's answers to the first --n-kl of them, and the mean
refusal log-odds of the run's refusal openings on the harmful and benign test prompts.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from abliterate import model, prompts
from abliterate.evaluation import damage
from abliterate.evaluation.measure import MeasureOptions, measure, summarize
from abliterate.evaluation.standalone import Options, prompt_sets
from abliterate.output.record import RunRecord, load_record
from abliterate.selection import refusal_log_odds


def measured(console: Console, spec: str, sets: dict, options: MeasureOptions, base=None):
    """Load one model, measure it on the test sets (against `base` when given), free it."""
    console.print(f"[bold]measuring[/] {spec}")
    lm = model.load(spec, progress=console.print)
    texts = {key: prompts.format_all(lm.tokenizer, s.texts) for key, s in sets.items()}
    return measure(lm, sets, texts, options, console, spec, base)


def forward_only(record: RunRecord, specs: dict[str, str], sets: dict, n_kl: int, kl_tokens: int, bs: int) -> None:
    """The forward-pass metrics of the three models (no judged answers), printed as a table."""
    ids = tuple(record.refusal_tokens["ids"])
    rows: dict[str, dict[str, float]] = {}
    first, reference = None, None
    for name, spec in specs.items():
        lm = model.load(spec, progress=lambda _: None)
        texts = {key: prompts.format_all(lm.tokenizer, s.texts) for key, s in sets.items()}
        harmless = model.last_token_logprobs(lm.model, lm.tokenizer, texts["harmless"], bs)
        if reference is None:  # the original comes first
            first = harmless
            reference = damage.reference_answers(lm.model, lm.tokenizer, texts["harmless"][:n_kl], kl_tokens, bs)
        per_token = damage.answer_kl(lm.model, reference, bs)
        rows[name] = {
            "first-token KL": model.kl_divergence(first, harmless).mean().item(),
            "per-token KL": sum(sum(k) / len(k) for k in per_token) / len(per_token),
            **{f"refusal log-odds, {key}": refusal_log_odds(model.last_token_logprobs(
                lm.model, lm.tokenizer, texts[key], bs), ids).mean().item() for key in ("harmful", "benign")},
        }  # fmt: skip
        del lm
    print(f"{len(sets['harmless'])} harmless (per-token KL: first {n_kl}), {len(sets['harmful'])} harmful, "
          f"{len(sets['benign'])} benign test prompts; forward passes only")  # fmt: skip
    print(f"{'':28} {'original':>9} {'edited':>9} {'healed':>9}  healed/edited")
    for metric in rows["original"]:
        a, b = rows["edited"][metric], rows["healed"][metric]
        ratio = f"{b / a:.2f}" if "KL" in metric and a else f"{b - a:+.2f}"
        print(f"{metric:28} {rows['original'][metric]:9.4f} {a:9.4f} {b:9.4f}  {ratio}")


def main() -> None:
    """Measure the three models and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run")
    parser.add_argument("healed")
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--kl-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--n-kl", type=int, default=32)
    args = parser.parse_args()
    console = Console(stderr=True)
    record = load_record(args.healed)
    assert record.heal, f"{args.healed} is not a healed folder"
    sets = prompt_sets(Options(n_test=args.n_test), record.split)
    if args.forward_only:
        specs = {"original": record.heal["original"], "edited": args.run, "healed": args.healed}
        return forward_only(record, specs, sets, args.n_kl, args.kl_tokens, args.batch_size)
    options = MeasureOptions(args.max_new_tokens, args.kl_tokens, args.batch_size)
    base = measured(console, record.heal["original"], sets, options)
    edited = summarize(base, measured(console, args.run, sets, options, base))
    healed = summarize(base, measured(console, args.healed, sets, options, base))
    rows = [
        ("first-token KL", lambda m: m.kl["kl_first_token_harmless"].value, True),
        ("per-token KL", lambda m: m.kl["kl_answer_harmless"].value, True),
        ("refusal, harmful", lambda m: m.rates["harmful_refusal"].after.value, False),
        ("over-refusal, benign", lambda m: m.rates["benign_refusal"].after.value, False),
    ]
    original = {
        "refusal, harmful": edited.rates["harmful_refusal"],
        "over-refusal, benign": edited.rates["benign_refusal"],
    }
    print(
        f"{len(sets['harmless'])} harmless, {len(sets['harmful'])} harmful, {len(sets['benign'])} benign test prompts"
    )
    print(f"{'':22} {'original':>9} {'edited':>9} {'healed':>9}  healed/edited")
    for name, get, is_kl in rows:
        before = 0.0 if is_kl else original[name].before.value  # type: ignore[union-attr]
        a, b = get(edited), get(healed)
        ratio = f"{b / a:.2f}" if is_kl and a else f"{(b - a) * 100:+.1f} points"
        print(f"{name:22} {before:9.4f} {a:9.4f} {b:9.4f}  {ratio}")


if __name__ == "__main__":
    main()
