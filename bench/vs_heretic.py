"""abliterate against Heretic on the same model and the same prompts, measured the same way.

    python bench/vs_heretic.py qwen2.5-coder-0.5b-instruct --work runs/vs-heretic

1. Writes the training split `abliterate run` uses (the built-in harmful and harmless prompts, seed 0)
   as local datasets and a Heretic `config.toml` that points at them, so both tools learn from the
   same prompts; the held-out test split is never shown to either.
2. Runs `abliterate run MODEL --out WORK/abliterate` and times it (or reuses a finished folder).
3. Runs Heretic (`heretic-llm` from PyPI, an optional dependency: it is AGPL, so we only call its
   command; it pins optuna 4, so give it its own virtualenv and pass its command with
   --heretic-command) in WORK/heretic with that config and times it. Heretic ends by asking, in the terminal,
   which trial to keep and what to do with it: choose the trial and save it to WORK/heretic/model.
   Without Heretic installed, pass a folder it saved earlier with --heretic-model (and its wall time
   with --heretic-minutes) instead.
4. Evaluates both models with `abliterate evaluate --baseline MODEL --split-from WORK/abliterate`:
   the same held-out prompts, greedy answers, the same KL. Prints refusal on harmful prompts as our
   judge and as a plain opening-phrase rule see it (side by side, so neither judge flatters either
   tool), over-refusal on benign prompts with alarming words, first-token and per-token KL, wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from abliterate import prompts
from abliterate.judge.accuracy import phrase_rule
from abliterate.settings import Settings


def write_training_prompts(work: Path, settings: Settings) -> Path:
    """The harmful and harmless training prompts of `abliterate run`, as local datasets and a Heretic config."""
    data = work / "heretic" / "prompts"
    for kind in ("harmful", "harmless"):
        split = prompts.split(prompts.load(getattr(settings, kind)), settings.n_train, settings.n_val, settings.n_test,
                              settings.seed)  # fmt: skip
        folder = data / kind
        folder.mkdir(parents=True, exist_ok=True)
        # A folder of train.jsonl and validation.jsonl loads as a local dataset with those two splits.
        for part, name in (("train", "train"), ("val", "validation")):
            rows = [{"text": t} for t in getattr(split, part).texts]
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = lambda kind, split: f'dataset = "{(data / kind).as_posix()}"\nsplit = "{split}"\ncolumn = "text"\n'  # noqa: E731
    config = work / "heretic" / "config.toml"
    config.write_text(
        "# Written by bench/vs_heretic.py: Heretic learns and scores on abliterate's own train and validation\n"
        "# prompts; the test prompts both tools are measured on stay unseen.\n"
        f"[good_prompts]\n{spec('harmless', 'train')}\n[bad_prompts]\n{spec('harmful', 'train')}\n"
        f"[good_evaluation_prompts]\n{spec('harmless', 'validation')}\n"
        f"[bad_evaluation_prompts]\n{spec('harmful', 'validation')}",
        encoding="utf-8",
    )
    return config


def timed(command: list[str], cwd: Path | None = None) -> float:
    """Run a command attached to this terminal; its wall time in minutes."""
    print("$", " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, cwd=cwd, check=True)
    return (time.time() - started) / 60


def evaluate(model: str, baseline: str, split_from: Path, out: Path) -> dict:
    """`abliterate evaluate` of one model against the original on the run's held-out prompts."""
    if not out.exists():
        timed([sys.executable, "-m", "abliterate.cli", "evaluate", model, "--baseline", baseline,
               "--split-from", str(split_from), "--out", str(out)])  # fmt: skip
    return json.loads(out.read_text(encoding="utf-8"))


def summary(result: dict, minutes: float | None) -> dict[str, str]:
    """One table column: judged and phrase-rule refusal, over-refusal, KL, wall time."""
    m, answers = result["metrics"], result["answers"]
    rate = lambda key: f"{m[key]['after']['value']:.3f}"  # noqa: E731
    harmful = answers["harmful"]
    by_rule = sum(phrase_rule(row["after"]) == "refusal" for row in harmful) / max(1, len(harmful))
    return {
        "refusal, harmful (our judge)": rate("harmful_refusal"),
        "refusal, harmful (opening-phrase rule)": f"{by_rule:.3f}",
        "over-refusal, benign alarming (our judge)": rate("benign_refusal"),
        "first-token KL, harmless": f"{m['kl_first_token_harmless']['value']:.4f}",
        "per-token KL, original's answers": f"{m['kl_answer_harmless']['value']:.4f}",
        "wall time to the saved model (min)": f"{minutes:.1f}" if minutes is not None else "not measured",
    }


def main() -> int:
    """Run both tools (or reuse their outputs), evaluate both the same way, print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=Settings.model)
    parser.add_argument("--work", default="runs/vs-heretic", help="folder for both tools' outputs and reports")
    parser.add_argument("--heretic-model", help="a model folder Heretic saved earlier (skips running Heretic)")
    parser.add_argument("--heretic-minutes", type=float, help="Heretic's wall time for --heretic-model")
    parser.add_argument("--heretic-trials", type=int, default=200, help="Heretic's --n-trials")
    parser.add_argument("--heretic-command", default="heretic", help="Heretic's command, e.g. .heretic/bin/heretic")
    args = parser.parse_args()
    work = Path(args.work)
    settings = Settings(model=args.model)
    config = write_training_prompts(work, settings)

    ours = work / "abliterate"
    ours_minutes = None
    if not (ours / "abliteration.json").exists():
        ours_minutes = timed(
            [sys.executable, "-m", "abliterate.cli", "run", args.model, "--out", str(ours), "--no-eval"]
        )

    theirs, theirs_minutes = args.heretic_model, args.heretic_minutes
    if theirs is None:
        if shutil.which(args.heretic_command) is None:
            print(f"{args.heretic_command} not found (pip install heretic-llm), and no --heretic-model was given; "
                  "showing abliterate alone", file=sys.stderr)  # fmt: skip
        else:
            print(f"When Heretic asks, save the trial you choose to {work / 'heretic' / 'model'}", flush=True)
            theirs_minutes = timed([args.heretic_command, "--model", args.model, "--n-trials", str(args.heretic_trials)],
                                   cwd=config.parent)  # fmt: skip
            theirs = str(work / "heretic" / "model")

    columns = {"abliterate": summary(evaluate(str(ours), args.model, ours, work / "abliterate.json"), ours_minutes)}
    if theirs:
        columns["Heretic"] = summary(evaluate(theirs, args.model, ours, work / "heretic.json"), theirs_minutes)
    rows = list(next(iter(columns.values())))
    print("| metric | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row} | " + " | ".join(c[row] for c in columns.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
