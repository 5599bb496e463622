"""A recorded edit as a PEFT LoRA adapter: rank 1 per edited matrix, checked against the weight edit.

The edit W <- W - s u (u . W) along the residual axis is the rank-1 update B A with B = -s u and
A = u . W (the contraction over the residual axis), which is the LoRA layout of PEFT's Linear,
Conv1D (fan_in_fan_out) and Embedding layers alike; with r = lora_alpha = 1 the scaling is 1.
Bias edits go into PEFT's lora_bias. Fused 3-D expert tensors use target_parameters, one rank-1
pair per expert. Where the model ties its output head to the embeddings, the edited embedding is
stored whole (modules_to_save), because a LoRA on a tied matrix would also change the head, which
the edit leaves alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from rich.console import Console
from torch import nn
from transformers.pytorch_utils import Conv1D

from abliterate import files, model
from abliterate.architectures import Architecture, input_embeddings
from abliterate.edit import EditParams, Target, edit_targets, remove_component_
from abliterate.errors import AbliterateError, require
from abliterate.output import record as run_record
from abliterate.settings import LoadOptions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER = "default"


@dataclass(frozen=True)
class AdapterPlan:
    """How each edited tensor is expressed in PEFT terms."""

    lora: dict[str, list[Target]]  # module name -> its edited weight (and bias), as LoRA layers
    experts: list[Target]  # fused 3-D expert tensors, via target_parameters
    whole: list[Target]  # embeddings stored whole: tied to the head, or lora_bias rules LoRA out
    bias: bool
    fan_in_fan_out: bool


def _split(name: str) -> tuple[str, str]:
    module, _, attribute = name.rpartition(".")
    return module, attribute


def plan(net: nn.Module, arch: Architecture, direction: torch.Tensor, params: EditParams) -> AdapterPlan:
    """Sort the edit's tensors into LoRA layers, expert parameters and whole copies; refuse what PEFT can't hold."""
    targets = edit_targets(net, arch, direction, params)
    hf = cast("PreTrainedModel", net)
    head, embed = hf.get_output_embeddings(), input_embeddings(net)
    tied = head is not None and head.weight is embed.weight
    bias = any(_split(t.name)[1] == "bias" for t in targets)
    lora: dict[str, list[Target]] = {}
    experts: list[Target] = []
    whole: list[Target] = []
    for target in targets:
        module_name, attribute = _split(target.name)
        module = net.get_submodule(module_name)
        if isinstance(module, nn.Embedding):
            # PEFT has no lora_bias for embeddings, and a LoRA on a tied embedding would move the head too.
            (whole if (tied and module is embed) or bias else lora.setdefault(module_name, [])).append(target)
        elif isinstance(module, (nn.Linear, Conv1D)):
            lora.setdefault(module_name, []).append(target)
        elif target.tensor.ndim == 3:
            experts.append(target)
        else:
            raise AbliterateError(
                f"{hf.config.model_type}: {target.name} ({type(module).__name__}, {target.tensor.ndim}-D) has no PEFT "
                "LoRA form (target_parameters takes 3-D expert weights only); save the edited model with "
                "`abliterate apply` instead"
            )
    if bias and experts:
        raise AbliterateError(
            f"{hf.config.model_type} has fused expert tensors and edited biases, and PEFT's target_parameters "
            "cannot carry a bias; save the edited model with `abliterate apply` instead"
        )
    unbiased = [m for m in lora if getattr(net.get_submodule(m), "bias", None) is None]
    if bias and unbiased:
        raise AbliterateError(
            f"some edited layers have biases and some ({unbiased[0]}, ...) do not, and PEFT cannot merge such an "
            "adapter; save the edited model with `abliterate apply` instead"
        )
    fan_in_fan_out = any(isinstance(net.get_submodule(m), Conv1D) for m in lora)
    return AdapterPlan(lora, experts, whole, bias, fan_in_fan_out)


def _contract(target: Target) -> torch.Tensor:
    """u . W over the residual axis, in float64: the A factor of the rank-1 update."""
    tensor = target.tensor.detach().double()
    return torch.tensordot(tensor, target.direction.to(tensor.device), dims=([target.axis], [0]))


def _exact_delta(target: Target, scale: float) -> torch.Tensor:
    """What orthogonalize adds to the tensor, in float64."""
    edited = target.tensor.detach().double().clone()
    remove_component_(edited, target.axis, target.direction, scale)
    return edited - target.tensor.detach().double()


def _fill_lora(layer: Any, target: Target, scale: float) -> torch.Tensor:
    """Set one LoRA layer's factors (or bias) to the edit; return the delta PEFT computes from them.

    `layer` is a PEFT LoRA layer (peft is optional, so it is not imported for its types).
    """
    b = -scale * target.direction
    if _split(target.name)[1] == "bias":
        layer.lora_B[ADAPTER].bias.copy_(b * (target.direction @ target.tensor.double()))
        return layer.lora_B[ADAPTER].bias.double() * layer.scaling[ADAPTER]
    a = _contract(target)
    if isinstance(layer.get_base_layer(), nn.Embedding):
        layer.lora_embedding_A[ADAPTER].copy_(a.unsqueeze(0))
        layer.lora_embedding_B[ADAPTER].copy_(b.unsqueeze(1))
    else:
        layer.lora_A[ADAPTER].weight.copy_(a.unsqueeze(0))
        layer.lora_B[ADAPTER].weight.copy_(b.unsqueeze(1))
    return layer.get_delta_weight(ADAPTER)


def _fill_experts(layer: Any, target: Target, scale: float) -> torch.Tensor:
    """One rank-1 pair per expert: row e of lora_A and column e of lora_B (PEFT's layout for r=1)."""
    a = _contract(target)  # (experts, the non-residual width)
    b = -scale * target.direction
    n = a.shape[0]
    # PEFT reads a 3-D parameter as (experts, in, out), or (experts, out, in) when it swapped them.
    out_axis = 1 if layer._did_swap_in_out_features else 2
    if target.axis == out_axis:
        lora_a, lora_b = a, b.unsqueeze(1).expand(-1, n)
    else:
        lora_a, lora_b = b.unsqueeze(0).expand(n, -1), a.T
    layer.lora_A[ADAPTER].weight.copy_(lora_a)
    layer.lora_B[ADAPTER].weight.copy_(lora_b)
    return layer.get_delta_weight(ADAPTER)


@torch.no_grad()
def build(net: nn.Module, arch: Architecture, direction: torch.Tensor, params: EditParams):
    """Wrap `net` (in place) in a PeftModel whose adapter is the edit; return it and the largest error.

    The error is the largest absolute difference between the weight change PEFT computes from the
    adapter and the change `orthogonalize` makes, over every edited tensor.
    """
    peft = require("peft", "adapter", "export-adapter")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model  # noqa: N806
    how = plan(net, arch, direction, params)
    config = LoraConfig(
        r=1,
        lora_alpha=1,
        lora_dropout=0.0,
        target_modules=sorted(how.lora) or None,
        target_parameters=[t.name for t in how.experts] or None,
        modules_to_save=[_split(t.name)[0] for t in how.whole] or None,
        lora_bias=how.bias,
        fan_in_fan_out=how.fan_in_fan_out,
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about tied embeddings, which `plan` handles
        peft_model = get_peft_model(net, config)
    inner = peft_model.base_model.model
    error = 0.0
    for module_name, targets in how.lora.items():
        for target in targets:
            got = _fill_lora(inner.get_submodule(module_name), target, target.scale)
            error = max(error, (got.double() - _exact_delta(target, target.scale)).abs().max().item())
    for target in how.experts:
        module_name, attribute = _split(target.name)
        layer = inner.get_submodule(module_name)
        while layer.parameter_name != attribute:  # PEFT nests one wrapper per targeted parameter
            layer = layer.base_layer
        got = _fill_experts(layer, target, target.scale)
        error = max(error, (got.double() - _exact_delta(target, target.scale)).abs().max().item())
    for target in how.whole:
        copy = inner.get_submodule(_split(target.name)[0]).modules_to_save[ADAPTER]
        remove_component_(copy.weight, target.axis, target.direction, target.scale)
    return peft_model, error


def export_adapter(
    run_dir: str,
    base: str,
    out_dir: str,
    force: bool = False,
    load: LoadOptions = LoadOptions(),
    console: Console | None = None,
) -> Path:
    """Save a run's edit as a PEFT LoRA adapter for the original model `base`."""
    console = console or Console(stderr=True, soft_wrap=True)
    run = Path(run_dir).expanduser()
    if not run.exists():
        raise AbliterateError(
            f"{run} does not exist; pass the --out folder of a finished run (or its abliteration.json)"
        )
    recorded = run_record.read_edit(run)  # the record admits only projections (orthogonalize, induce): rank 1
    if recorded.params.norm_preserving:
        raise AbliterateError(
            "the run's edit is norm-preserving: rescaling every weight column makes it full-rank, so no small LoRA "
            "adapter reproduces it; save the edited model with `abliterate apply` instead"
        )
    if recorded.direction.ndim == 2:
        raise AbliterateError(
            f"the run's edit removes {recorded.direction.shape[0]} directions at once and this export writes rank-1 "
            "adapters; save the edited model with `abliterate apply` instead"
        )
    out = files.check_output(out_dir, force)
    source = model.resolve(base, load.allow_pickle)
    console.print(f"[bold]loading[/] {base}")
    # float32 on CPU: the adapter's factors are computed from the base weights, not from a device's rounding.
    lm = model.load(source, replace(load, dtype="float32", device="cpu"), console.print)
    if recorded.direction.shape[-1] != input_embeddings(lm.model).weight.shape[1]:
        raise AbliterateError(
            f"the direction has {recorded.direction.shape[-1]} dimensions but {base} has a different hidden size; "
            "pass the model the run was made on as --base"
        )
    peft_model, error = build(lm.model, lm.arch, recorded.direction, recorded.params)
    peft_model.peft_config[ADAPTER].base_model_name_or_path = run_record.base_model(source) or base
    with files.staging(out, force) as tmp:
        with warnings.catch_warnings():
            # PEFT takes any 1-D LoRA tensor for an unsaved shard; lora_B's bias is 1-D by nature.
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
            peft_model.save_pretrained(tmp)
        adapter = {"base": base, "rank": 1, "max_abs_weight_error": error}
        run_record.write_record(tmp, replace(recorded.record, adapter=adapter))
    console.print(f"[bold green]saved[/] adapter {out} (largest weight difference from the edit: {error:.2g})")
    return out
