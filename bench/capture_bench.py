"""Benchmark: capture memory stays flat as the number of prompts grows; batching speeds it up.

Prints ratios measured in one run on a small random llama (no download):
  .venv/bin/python bench/capture_bench.py
Each memory measurement runs in its own process and reads its peak RSS.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def setup():
    import torch

    from abliterate.architectures import architecture_for
    from abliterate.tiny import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = tiny_model("llama", dtype=torch.float32, hidden_size=256, intermediate_size=512, num_hidden_layers=8)
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    return model, tok, architecture_for(model)


def prompts(n: int) -> list[str]:
    return [f"<|user|>request number {i} about topic {i * 7 % 13}<|end|><|assistant|>" for i in range(n)]


def child(n: int) -> None:
    from abliterate.capture import collect

    model, tok, arch = setup()
    collect(model, tok, arch, prompts(n), batch_size=16)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss_kb(n: int) -> int:
    out = subprocess.run([sys.executable, str(HERE), "--child", str(n)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from abliterate.capture import collect

    small, large = 32, 1024
    rss_small, rss_large = peak_rss_kb(small), peak_rss_kb(large)
    model, tok, arch = setup()
    texts = prompts(64)
    t0 = time.perf_counter()
    collect(model, tok, arch, texts, batch_size=1)
    t1 = time.perf_counter()
    collect(model, tok, arch, texts, batch_size=16)
    t2 = time.perf_counter()
    print(f"peak RSS, {large} vs {small} prompts: {rss_large / rss_small:.3f}x (prompts: {large // small}x)")
    print(f"collect time, batch 1 vs batch 16: {(t1 - t0) / (t2 - t1):.2f}x faster batched")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
    else:
        main()
