"""`abliterate apply`: re-apply a run's recorded edit to a model and save it (shard by shard where it can)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from abliterate import files, model
from abliterate.architectures import input_embeddings
from abliterate.edit import orthogonalize
from abliterate.errors import AbliterateError
from abliterate.export import hub, sharded
from abliterate.output import card
from abliterate.output import record as run_record
from abliterate.settings import LoadOptions


def apply(source: str, edit_file: str, out_dir: str, force: bool = False, dtype: str = "auto",
          load: LoadOptions = LoadOptions(), console: Console | None = None, push_to_hub: str | None = None,
          in_memory: bool = False, trial: int | None = None) -> Path:  # fmt: skip
    """Re-apply a recorded edit (abliteration.json + its directions file) to a model and save it.

    A local safetensors folder is edited shard by shard (peak memory about one shard) unless
    in_memory is set or its layout needs transformers' loader; everything else is loaded whole, in
    the source's dtype. Either way the edit is computed in float64 and rounded once to `dtype`, the
    save dtype ('auto' or 'source': the source's), and untouched tensors are copied as they are.
    The model is always read in its own dtype, so load.dtype is not used.
    """
    console = console or Console(stderr=True, soft_wrap=True)
    model.save_dtype(dtype, torch.float32)  # an unknown dtype fails before anything is read
    recorded = run_record.read_edit(edit_file, trial)  # trial: another point of a searched run's front
    params, direction = recorded.params, recorded.direction
    out = files.check_output(out_dir, force)
    if push_to_hub:
        hub.check(push_to_hub)
    resolved = model.resolve(source, load.allow_pickle)
    plan = None
    if resolved.kind == "folder" and not in_memory:
        assert resolved.path is not None  # resolve() gives every local source its folder
        try:
            plan = sharded.prepare(resolved.path, direction, params, dtype, load.device, load.trust_remote_code)
            console.print(f"[bold]streaming[/] {source}: {len(plan.shards)} shard(s), one at a time")
        except sharded.NotStreamable as exc:
            console.print(f"  loading the whole model: {exc}")
    if plan is None:
        console.print(f"[bold]loading[/] {source}")
        lm = model.load(resolved, replace(load, dtype="source"), console.print)
        if direction.shape[-1] != input_embeddings(lm.model).weight.shape[1]:
            raise AbliterateError(
                f"the direction has {direction.shape[-1]} dimensions but {source} has a different hidden size; use the model the edit was made on"
            )
        edited = orthogonalize(lm.model, lm.arch, direction, params, dtype=model.save_dtype(dtype, lm.source_dtype))
    with files.staging(out, force) as tmp:
        if plan is None:
            run_record.save_model(lm, tmp, dtype)
        else:
            edited = plan.write(tmp)
        recorded.save_directions(tmp)
        applied = replace(
            recorded.record,
            applied_to={"source": source, "sha256": resolved.sha256},
            edit=replace(recorded.record.edit, edited_tensors=edited),
        )
        run_record.write_record(tmp, applied)
        (tmp / "README.md").write_text(card.model_card(applied), encoding="utf-8")
    console.print(f"[bold green]saved[/] {out}")
    if push_to_hub:
        console.print(f"[bold]uploaded[/] {hub.push(out, push_to_hub)}")
    return out
