"""Benchmark: the judge's cost per item on CPU, rule stage alone vs rules + learned stage.

Prints milliseconds per item measured in one run over the built-in labelled set:
  .venv/bin/python bench/judge_bench.py
The first call loads the sentence encoder; it is timed separately.
"""

from __future__ import annotations

import json
import time

from abliterate.judge import judge_many, rule_judge
from abliterate.judge.learned import encoder
from abliterate.prompts import DATA


def main() -> None:
    rows = [json.loads(line) for line in (DATA / "judge_labelled.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = [(r["prompt"], r["response"]) for r in rows]
    started = time.perf_counter()
    encoder()
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    for p, r in pairs:
        rule_judge(p, r)
    rules_ms = 1000 * (time.perf_counter() - started) / len(pairs)
    started = time.perf_counter()
    judge_many(pairs)
    full_ms = 1000 * (time.perf_counter() - started) / len(pairs)
    print(f"{len(pairs)} labelled answers; encoder load {load_s:.1f} s (once per process)")
    print(f"rules only:       {rules_ms:.2f} ms per item")
    print(f"rules + learned:  {full_ms:.2f} ms per item (batched)  = {full_ms / rules_ms:.0f}x the rules")


if __name__ == "__main__":
    main()
