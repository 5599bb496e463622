"""Benchmark: how the cost of collect + select grows with model size, layer-streamed and in memory.

For each built-in model whose dequantized weights are in the cache (others are skipped with a
message), each mode runs in its own process: load in float32 on the CPU, learn the refusal
openings (short greedy answers), collect the residual means, score the candidates and search the
strength ladder, exactly as `abliterate run` does. Printed: the model's float32 size, peak RSS, the
seconds of each step, the chosen edit, and the streamed / in-memory ratios, all from one run:
  ABLITERATE_CACHE=/tmp/h9cache nice -n 10 .venv/bin/python bench/scale.py [--n-train 32 --n-val 8 --models a,b]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
FORCE_STREAM = "1B"  # a --max-memory below any model: always stream


def child(name: str, streamed: bool, n_train: int, n_val: int, batch_size: int) -> None:
    """One mode of one model, in this process; prints one JSON line."""
    import torch

    from abliterate import capture, directions, forward, model, prompts
    from abliterate.selection import find_refusal_tokens, select_direction
    from abliterate.settings import LoadOptions

    torch.manual_seed(0)
    options = LoadOptions(dtype="float32", device="cpu", max_memory=FORCE_STREAM if streamed else "1TB")
    times = {}
    t = time.perf_counter()
    lm = model.load(name, options, lambda _: None, streamable=True)
    assert (forward.stream_of(lm.model) is not None) == streamed
    times["load"] = time.perf_counter() - t
    tok = lm.tokenizer
    fmt = lambda part: prompts.format_all(tok, part.texts)  # noqa: E731
    harmful = prompts.split(prompts.load("harmful"), n_train, n_val, 0)
    harmless = prompts.split(prompts.load("harmless"), n_train, n_val, 0)
    t = time.perf_counter()
    refusal = find_refusal_tokens(lm.model, tok, fmt(harmful.train)[:32], fmt(harmless.train)[:16], batch_size)
    times["refusal_openings"] = time.perf_counter() - t
    print(f"{name}: {times}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    means = [capture.collect(lm.model, tok, lm.arch, fmt(s.train), batch_size) for s in (harmful, harmless)]
    times["collect"] = time.perf_counter() - t
    print(f"{name}: {times}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    candidates = directions.difference_of_means(*means)
    chosen = select_direction(lm.model, tok, lm.arch, candidates, fmt(harmful.val), fmt(harmless.val), refusal,
                              batch_size).chosen  # fmt: skip
    times["select"] = time.perf_counter() - t
    result = {
        "times": times,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "chosen": {
            "position": chosen.position,
            "layer": chosen.layer,
            "scale": chosen.scale,
            "start_layer": chosen.start_layer,
            "kl": chosen.kl,
            "refusal": chosen.refusal,
        },  # fmt: skip
        "refusal_tokens": list(refusal.tokens),
    }
    print(json.dumps(result))


def measure(name: str, streamed: bool, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(HERE), "--child", name, "--streamed" if streamed else "--whole",
               "--n-train", str(args.n_train), "--n-val", str(args.n_val), "--batch-size", str(args.batch_size)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} ({'streamed' if streamed else 'in memory'}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from abliterate import offline
    from abliterate.forward import checkpoint_bytes

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        folder = offline.dequantized_dir(offline.BUILTIN_MODELS[name])
        if not (folder / "config.json").is_file():
            print(
                f"skipping {name}: its dequantized weights are not in {folder} (one `abliterate run {name}` makes them)"
            )
            continue
        import torch

        size = checkpoint_bytes(folder, torch.float32)
        results = {}
        for mode in ("in memory", "streamed"):
            results[mode] = r = measure(name, mode == "streamed", args)
            t = r["times"]
            print(
                f"{name:28} {mode:9} float32 {size / 2**30:5.2f} GiB  peak RSS {r['peak_rss'] / 2**30:5.2f} GiB "
                f"({r['peak_rss'] / size:4.2f}x the weights)  load {t['load']:6.1f}s  openings {t['refusal_openings']:6.1f}s "
                f"collect {t['collect']:6.1f}s  select {t['select']:7.1f}s  chosen {r['chosen']}",
                flush=True,
            )
        rows.append((name, size, results))
    print()
    print("| model | float32 weights | peak RSS in memory | peak RSS streamed | streamed / in memory: RSS | time "
          "(collect + select) | same choice |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, size, results in rows:
        whole, streamed = results["in memory"], results["streamed"]
        seconds = {k: v["times"]["collect"] + v["times"]["select"] for k, v in results.items()}
        same = whole["chosen"]["layer"] == streamed["chosen"]["layer"] and all(
            whole["chosen"][k] == streamed["chosen"][k] for k in ("position", "scale", "start_layer")
        )
        print(
            f"| {name} | {size / 2**30:.2f} GiB | {whole['peak_rss'] / 2**30:.2f} GiB | "
            f"{streamed['peak_rss'] / 2**30:.2f} GiB | {streamed['peak_rss'] / whole['peak_rss']:.2f}x | "
            f"{seconds['streamed'] / seconds['in memory']:.2f}x | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        p = argparse.ArgumentParser()
        p.add_argument("--child")
        p.add_argument("--streamed", action="store_true")
        p.add_argument("--whole", action="store_true")
        p.add_argument("--n-train", type=int)
        p.add_argument("--n-val", type=int)
        p.add_argument("--batch-size", type=int)
        a = p.parse_args()
        child(a.child, a.streamed, a.n_train, a.n_val, a.batch_size)
    else:
        main()
