"""Benchmark: `abliterate apply` streamed shard by shard against loading the whole model.

Generates random float32 llamas of about 0.5 and 0.9 GB in 50 MB shards, applies the same edit
both ways, each in its own process, and prints each process's peak RSS (Linux VmHWM) against the
model's size:
  .venv/bin/python bench/apply_bench.py
The baseline process imports what `apply` imports and builds the model on the meta device (no
weights): the fixed cost of Python, torch and transformers, which no streaming removes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
MB = 1024 * 1024


def make_model(folder: Path, n_layers: int) -> Path:
    """A random float32 llama, 50 MB shards, with a tokenizer and a recorded edit beside it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from abliterate.tiny import recorded_edit, tiny_tokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=n_layers, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=16000, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder / "model", max_shard_size="50MB")
    tiny_tokenizer().save_pretrained(folder / "model")
    recorded_edit(folder / "run", 1024)
    return folder / "model"


def child(mode: str, folder: Path) -> None:
    from rich.console import Console

    from abliterate.apply import apply as apply_edit

    if mode == "baseline":
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder / "model"))
    else:
        quiet = Console(file=open("/dev/null", "w"))
        apply_edit(str(folder / "model"), str(folder / "run" / "abliteration.json"), str(folder / mode),
                       in_memory=mode == "memory", console=quiet)  # fmt: skip
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024)


def peak_rss(mode: str, folder: Path) -> int:
    cmd = [sys.executable, str(HERE), "--child", mode, str(folder)]
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def main() -> None:
    for n_layers in (8, 16):
        with tempfile.TemporaryDirectory(prefix="apply-bench-") as tmp:
            folder = Path(tmp)
            shards = list(make_model(folder, n_layers).glob("*.safetensors"))
            size, largest = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
            baseline = peak_rss("baseline", folder)
            print(f"model: {size / MB:.0f} MB in {len(shards)} shards, largest {largest / MB:.0f} MB; "
                  f"baseline (imports, meta model) {baseline / MB:.0f} MB")  # fmt: skip
            for mode, label in (("stream", "streamed"), ("memory", "in memory")):
                peak = peak_rss(mode, folder)
                print(f"  {label:>9}: peak RSS {peak / MB:5.0f} MB = {peak / size:.2f} x model size; "
                      f"{(peak - baseline) / MB:4.0f} MB above baseline = {(peak - baseline) / largest:.1f} x largest shard")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
