"""6. Heal: a short LoRA distillation of the edited model back toward the original, off the removed direction.

The student is the run's edited model with LoRA on every residual-stream writer; the teacher is the
original. The loss is KL(original || student) of the next-token distributions, teacher-forced on
harmless training prompts followed by the original's own greedy answers (the quantity the
evaluation reports), with the teacher's distribution kept as its top-k log-probs plus the tail mass.

Refusal cannot come back through the update: after every optimizer step each writer's LoRA B is
projected onto the orthogonal complement of the direction that writer's edit removed
(B <- B - u (u . B)), so u . (W + B A) = u . W: along u every writer computes exactly what the
edited model's does. Other routes stay open, so the loss also holds the student's first-token
distribution after harmful training prompts to the edited model's own (the anchor). A watchdog measures the refusal log-odds on the harmful validation prompts
every `check_every` steps, keeps the best checkpoint and stops when they rise; the end judges
whole answers. Checkpoints live beside the output and a rerun resumes from the last one; the output
folder appears only when complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from abliterate import files, model, prompts
from abliterate.architectures import all_layer_writers, hidden_size, layers
from abliterate.edit import writer_directions
from abliterate.errors import AbliterateError, require
from abliterate.evaluation.damage import teacher_forced
from abliterate.judge import judge_many
from abliterate.output import card
from abliterate.output import record as run_record
from abliterate.progress import progress_bar
from abliterate.selection import refusal_log_odds
from abliterate.settings import LoadOptions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER = "default"
WORK_VERSION = 1  # layout of the checkpoint folder; a change starts healing over


@dataclass(frozen=True)
class HealOptions:
    """How long and how hard to heal; the defaults fit the 0.5B model on a CPU in about 15 minutes."""

    steps: int = 120
    lr: float = 5e-4
    rank: int = 8
    batch_size: int = 8
    minutes: float = 15.0  # wall-clock budget of one invocation; training stops early enough to finish in it
    check_every: int = 20
    seed: int = 0
    n_prompts: int = 128  # harmless training prompts (the run's training split), before the user's own
    n_val: int = 16  # harmless validation prompts whose KL picks the best checkpoint
    answer_tokens: int = 32  # the original's greedy answer tokens distilled per prompt
    top_k: int = 128  # teacher log-probs kept per position (plus the tail mass)
    refusal_margin: float = 0.25  # rise of the mean refusal log-odds over the edited model's that stops training
    anchor: float = 1.0  # weight of the first-token KL to the edited model itself on harmful training prompts
    judge_tokens: int = 32  # answer length judged at the start and the end
    prompts: tuple[str, ...] = ()  # extra harmless prompt files (or hub names)
    original: str | None = None  # the original model; default: the one the run's record names
    adapter_only: bool = False
    load: LoadOptions = field(default_factory=LoadOptions)

    def check(self) -> None:
        """One-line errors for numbers out of range, before any model work."""
        for name in ("steps", "rank", "batch_size", "check_every", "n_prompts", "n_val", "answer_tokens", "top_k",
                     "judge_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise AbliterateError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0 or not self.minutes > 0 or self.refusal_margin < 0:
            raise AbliterateError("--lr and --minutes must be positive and --refusal-margin not negative")

    def teacher_inputs(self) -> dict[str, Any]:
        """The settings the original's cached distributions depend on."""
        keep = ("n_prompts", "n_val", "answer_tokens", "top_k", "prompts", "judge_tokens")
        return {k: v for k, v in asdict(self).items() if k in keep}

    def trained(self) -> dict[str, Any]:
        """The settings a training checkpoint depends on (steps, minutes and checks may change on a rerun)."""
        keep = ("lr", "rank", "batch_size", "seed", "anchor")
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass(frozen=True)
class Scores:
    """One model measured the heal's way: KL to the original on the validation prompts, refusal on harmful ones."""

    kl: float  # mean over prompts of the mean per-token KL(original || model), top-k + tail
    first_token_kl: float
    refusal_log_odds: float  # mean over harmful validation prompts


@dataclass
class HealResult:
    """What `heal` did: where it wrote, how far it trained, the three columns it measured."""

    out: Path
    steps: int
    stopped: str
    measured: dict[str, dict[str, float | None]]
    seconds: float


@dataclass
class Teacher:
    """The training and validation sequences and the original's top-k next-token log-probs along them."""

    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    values: list[torch.Tensor]  # per sequence (answer length, k) log-probs
    indices: list[torch.Tensor]  # per sequence (answer length, k) token ids
    tail: list[torch.Tensor]  # per sequence (answer length,) log of the mass outside the top k
    n_val: int  # the first n_val sequences are the validation ones
    original: dict[str, float | None]  # the original's refusal log-odds and judged refusal rate


def heal(run_dir: str, out_dir: str, options: HealOptions = HealOptions(), force: bool = False,
         console: Console | None = None) -> HealResult:  # fmt: skip
    """Distil the original back into a run's edited model on harmless inputs, never along the removed direction."""
    console = console or Console(stderr=True, soft_wrap=True)
    started = time.time()
    deadline = started + options.minutes * 60
    options.check()
    require("peft", "adapter", "healing")
    run = Path(run_dir).expanduser()
    recorded = _read_run(run)
    if (run / "config.json").is_file() is False:
        raise AbliterateError(
            f"{run} holds a record but no model (config.json); pass the --out folder of `abliterate run`"
        )
    out = files.check_output(out_dir, force)
    if out.resolve() == run.resolve():
        raise AbliterateError("--out is the run folder itself; name a new folder for the healed model")
    original = _original(recorded.record, options)
    work = _work_folder(out, _keys(run, original, options), console)
    texts = _prompt_texts(recorded.record, options)

    teacher = _teacher(console, work, original, recorded.record, texts, options)
    student = model.load(str(run), options.load, console.print)
    if recorded.direction.shape[-1] != hidden_size(student.model):
        raise AbliterateError(f"{run}'s direction does not fit its model's hidden size; the run folder is damaged")
    formatted = _format(student.tokenizer, recorded.record, texts["harmful"])
    net, targets = _with_lora(student.model, student.arch, recorded.direction, options)
    state = _resume(work, net, options)
    anchor = _anchor(work, net, student.tokenizer, recorded.record, texts["harmful_train"], options)
    trainer = _Trainer(net, targets, teacher, options, state, anchor)
    if "edited" not in state:
        console.print("[bold]measuring[/] the edited model")
        state["edited"] = asdict(_scores(trainer, student.tokenizer, recorded.record, formatted, options.batch_size))
        seconds = time.time()
        state["edited_judged"] = _judged(net, student.tokenizer, texts["harmful"], formatted, options)
        state["judge_seconds"] = time.time() - seconds
        _save_state(work, state)
    edited = Scores(**state["edited"])
    try:
        stopped = _train(console, trainer, student.tokenizer, recorded.record, formatted, work, state, edited, deadline)
    except KeyboardInterrupt:
        saved = json.loads((work / "state.json").read_text())["step"] if (work / "state.json").is_file() else 0
        console.print(f"  interrupted; the checkpoint of step {saved} is kept in {work}: rerun the command to resume")
        raise

    trainer.load_adapter(load_file(str(work / "best.safetensors")) if (work / "best.safetensors").is_file() else None)
    best = Scores(**state.get("best", {}).get("scores", asdict(edited)))
    healed_judged = _judged(net, student.tokenizer, texts["harmful"], formatted, options)
    if healed_judged is not None and state["edited_judged"] is not None and healed_judged > state["edited_judged"]:
        console.print(
            f"[yellow]warning:[/] judged refusal on the harmful validation prompts rose from "
            f"{state['edited_judged']:.0%} to {healed_judged:.0%}; check the answers before using the model"
        )
    leak = max_update_along(targets)
    measured: dict[str, dict[str, float | None]] = {
        "kl_per_token": {"original": 0.0, "edited": edited.kl, "healed": best.kl},
        "kl_first_token": {"original": 0.0, "edited": edited.first_token_kl, "healed": best.first_token_kl},
        "refusal_log_odds": {
            "original": teacher.original["refusal_log_odds"],
            "edited": edited.refusal_log_odds,
            "healed": best.refusal_log_odds,
        },
        "judged_refusal": {
            "original": teacher.original["judged_refusal"],
            "edited": state["edited_judged"],
            "healed": healed_judged,
        },
    }
    section = {
        "kind": "lora-distillation",
        "rank_1": False,
        "note": "a LoRA fine-tune on top of the edit, not a rank-1 edit, so `abliterate apply` cannot reproduce it",
        "run": str(run.resolve()),
        "original": original.spec,
        "settings": {k: v for k, v in asdict(options).items() if k != "load"} | {"prompts": list(options.prompts)},
        "steps": state["step"],
        "best_step": state.get("best", {}).get("step", 0),
        "stopped": stopped,
        "writers": len(targets),
        "constraint": "After every optimizer step each writer's LoRA B is projected off the direction its edit "
        "removed, so every writer's output along that direction is the edited model's",
        "max_update_along_direction": leak,
        "anchor": f"first-token KL to the edited model on {len(texts['harmful_train'])} harmful training prompts, "
        f"weight {options.anchor:g}",
        "measured": measured,
        "measured_on": f"{len(teacher.prompt_ids) - teacher.n_val} harmless training prompts distilled; KL on "
        f"{teacher.n_val} harmless validation prompts (top-{options.top_k} + tail), refusal on "
        f"{len(texts['harmful'])} harmful validation prompts",
        "history": state["history"],
    }
    healed_record = replace(
        recorded.record,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        metrics=None,  # the run's metrics measured the edited model, not this one
        heal=section,
    )
    console.print(f"[bold]saving[/] to {out}")
    with files.staging(out, force) as tmp:
        if options.adapter_only:
            _save_adapter(net, tmp, run)
        else:
            merged = _merge(net, targets)
            run_record.save_model(replace(student, model=merged), tmp, "source")
        recorded.save_directions(tmp)
        run_record.write_record(tmp, healed_record)
        (tmp / "README.md").write_text(card.model_card(healed_record), encoding="utf-8")
    if stopped == "time budget":  # the run may go on: the same command with --force continues from the checkpoint
        console.print(f"  out of time at step {state['step']} of {options.steps}; rerun with --force to continue")
    else:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.time() - started
    console.print(f"[bold green]healed[/] in {seconds / 60:.1f} min: {out}")
    return HealResult(out, state["step"], stopped, measured, seconds)


def _read_run(run: Path) -> run_record.RecordedEdit:
    """The run's record and direction; a healed folder is refused (heal the run it came from)."""
    record = run_record.load_record(run)
    if record.heal:
        raise AbliterateError(f"{run} is already healed; heal the run folder it came from ({record.heal['run']})")
    return run_record.read_edit(run)


def _original(record: run_record.RunRecord, options: HealOptions) -> model.ModelSource:
    """The teacher: --original, else the model the record says was edited."""
    spec = options.original or (record.applied_to or {}).get("source") or record.model.spec
    try:
        return model.resolve(spec, options.load.allow_pickle)
    except AbliterateError as exc:
        if options.original:
            raise
        raise AbliterateError(
            f"the run's original model '{spec}' is not usable here ({exc}); pass it with --original"
        ) from None


def _keys(run: Path, original: model.ModelSource, options: HealOptions) -> dict[str, str]:
    """What the cached teacher depends on (the run's record, the original, the prompts) and what training adds."""
    digest = lambda data: hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()  # noqa: E731
    record = hashlib.sha256((run / run_record.RECORD).read_bytes()).hexdigest()
    teacher = digest({"version": WORK_VERSION, "record": record, "original": original.spec,
                      "options": options.teacher_inputs()})  # fmt: skip
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in run.glob("*.safetensors"))
    return {"teacher": teacher, "train": digest({"teacher": teacher, "weights": weights, **options.trained()})}


TRAINING_FILES = (
    "state.json",
    "adapter.safetensors",
    "optimizer.safetensors",
    "best.safetensors",
    "anchor.safetensors",
)


def _work_folder(out: Path, keys: dict[str, str], console: Console) -> Path:
    """The checkpoint folder beside the output; what other settings left there is started over."""
    work = out.parent / f".{out.name}.heal"
    marker = work / "key.json"
    if work.exists():
        known = json.loads(marker.read_text()) if marker.is_file() else None
        if not isinstance(known, dict) or "teacher" not in known:
            raise AbliterateError(
                f"{work} exists and is not an abliterate heal checkpoint; move it or pick another --out"
            )
        if known == keys:
            return work
        if known["teacher"] != keys["teacher"]:
            console.print("  the checkpoint beside --out was made for other prompts or models; starting over")
            shutil.rmtree(work)
        else:
            console.print("  the checkpoint beside --out was trained with other settings; training starts over")
            for name in TRAINING_FILES:
                (work / name).unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(marker, json.dumps(keys))
    return work


def _prompt_texts(record: run_record.RunRecord, options: HealOptions) -> dict[str, list[str]]:
    """Harmless training prompts (the run's training split, then the user's), harmless and harmful validation ones."""
    split = record.split
    if split is None:
        raise AbliterateError(
            "the run's record has no prompt split (an older abliterate wrote it); rerun `abliterate run`"
        )
    sizes = (split["n_train"], split["n_val"], split["n_test"], split["seed"])
    cut = lambda key: prompts.split(  # noqa: E731
        prompts.load(split["sources"][key], split["prompt_column"], split["category_column"]), *sizes
    )
    harmless, harmful = cut("harmless"), cut("harmful")
    train = harmless.train.texts[: options.n_prompts]
    for spec in options.prompts:
        train += prompts.load(spec, split["prompt_column"], split["category_column"]).texts
    return {"train": train, "val": harmless.val.texts[: options.n_val], "harmful": harmful.val.texts,
            "harmful_train": harmful.train.texts[: options.n_prompts]}  # fmt: skip


def _format(tokenizer, record: run_record.RunRecord, texts: list[str]) -> list[str]:
    """Prompts in the chat template, as the run formatted them."""
    return prompts.format_all(
        tokenizer, texts, record.settings.get("system_prompt"), bool(record.settings.get("thinking"))
    )


def _teacher(console: Console, work: Path, original: model.ModelSource, record: run_record.RunRecord,
             texts: dict[str, list[str]], options: HealOptions) -> Teacher:  # fmt: skip
    """The original's answers and top-k log-probs along them, computed once and cached in the checkpoint folder."""
    file = work / "teacher.safetensors"
    if file.is_file():
        console.print("  the original's distributions: resumed from the checkpoint")
        return _read_teacher(file)
    console.print(f"[bold]loading[/] the original {original.spec}")
    lm = model.load(original, options.load, console.print)
    sequences = texts["val"] + texts["train"]
    formatted = _format(lm.tokenizer, record, sequences)
    with progress_bar(console, "the original's answers", len(formatted)) as step:
        pairs = model.generate_ids(lm.model, lm.tokenizer, formatted, options.answer_tokens, options.batch_size, step)
    prompt_ids, answer_ids = [p for p, _ in pairs], [a for _, a in pairs]
    n = len(pairs)
    values, indices, tail = [torch.empty(0)] * n, [torch.empty(0)] * n, [torch.empty(0)] * n
    with torch.no_grad(), progress_bar(console, "the original's distributions", n) as step:
        for i, lp in teacher_forced(lm.model, prompt_ids, answer_ids, options.batch_size):
            top = lp.topk(min(options.top_k, lp.shape[-1]), dim=-1)
            values[i], indices[i] = top.values.cpu(), top.indices.cpu()
            tail[i] = _log1mexp(torch.logsumexp(top.values, dim=-1)).cpu()
            step()
    harmful = _format(lm.tokenizer, record, texts["harmful"])
    odds = _refusal(lm.model, lm.tokenizer, record, harmful, options.batch_size)
    judged = _judged(lm.model, lm.tokenizer, texts["harmful"], harmful, options)
    teacher = Teacher(prompt_ids, answer_ids, values, indices, tail, len(texts["val"]),
                      {"refusal_log_odds": odds, "judged_refusal": judged})  # fmt: skip
    _write_teacher(file, teacher)
    del lm
    return teacher


def _write_teacher(file: Path, t: Teacher) -> None:
    lengths = [len(a) for a in t.answer_ids]
    tensors = {
        "prompt_ids": torch.tensor([x for p in t.prompt_ids for x in p], dtype=torch.long),
        "prompt_lengths": torch.tensor([len(p) for p in t.prompt_ids], dtype=torch.long),
        "answer_ids": torch.tensor([x for a in t.answer_ids for x in a], dtype=torch.long),
        "answer_lengths": torch.tensor(lengths, dtype=torch.long),
        "values": torch.cat(t.values).float().contiguous(),
        "indices": torch.cat(t.indices).long().contiguous(),
        "tail": torch.cat(t.tail).float().contiguous(),
    }
    meta = {"n_val": str(t.n_val), "original": json.dumps(t.original)}
    files.atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _read_teacher(file: Path) -> Teacher:
    tensors = load_file(str(file))
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    cut = lambda flat, lengths: list(flat.split(lengths.tolist()))  # noqa: E731
    answers = cut(tensors["answer_ids"], tensors["answer_lengths"])
    return Teacher(
        [p.tolist() for p in cut(tensors["prompt_ids"], tensors["prompt_lengths"])],
        [a.tolist() for a in answers],
        cut(tensors["values"], tensors["answer_lengths"]),
        cut(tensors["indices"], tensors["answer_lengths"]),
        cut(tensors["tail"], tensors["answer_lengths"]),
        int(meta["n_val"]),
        json.loads(meta["original"]),
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, finite where the top k hold (nearly) all the mass."""
    return torch.log1p(-x.exp().clamp(max=1 - 1e-7))


def topk_kl(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Per position KL(teacher || student) over the teacher's top k tokens and one bucket for the rest.

    The KL of these coarsened distributions; it is at most the full KL, and equals it as the tail mass goes to 0.
    """
    picked = student.gather(-1, indices.to(student.device))
    values, tail = values.to(student.device), tail.to(student.device)
    student_tail = _log1mexp(torch.logsumexp(picked, dim=-1))
    head = (values.exp() * (values - picked)).sum(-1)
    return (head + tail.exp() * (tail - student_tail)).clamp_min(0)


@dataclass(frozen=True)
class Target:
    """A writer with LoRA: its module name, its LoRA factors and the direction its update must avoid."""

    name: str
    layer: Any  # the peft LoRA layer (lora_A, lora_B, scaling by adapter name)
    direction: torch.Tensor  # unit, float64


def _with_lora(net: nn.Module, arch, direction: torch.Tensor, options: HealOptions) -> tuple[nn.Module, list[Target]]:
    """peft LoRA on every Linear (or Conv1D) writer; its B factor starts at zero, on the complement of u."""
    from peft import LoraConfig, get_peft_model

    names: dict[str, torch.Tensor] = {}
    per_layer = zip(layers(net, arch), all_layer_writers(net, arch), writer_directions(net, arch, direction))
    for index, (layer, writers, us) in enumerate(per_layer):
        for writer, u in zip(writers, us):
            for weight in writer.weights:
                if isinstance(weight, str) and isinstance(layer.get_submodule(weight), (nn.Linear, Conv1D)):
                    names[f"{arch.layers}.{index}.{weight}"] = u
    if not names:
        raise AbliterateError("this model's writers are not Linear layers (fused experts only); heal cannot adapt them")
    torch.manual_seed(options.seed)  # LoRA's A starts random
    config = LoraConfig(r=options.rank, lora_alpha=options.rank, lora_dropout=0.0, target_modules=list(names),
                        fan_in_fan_out=any(isinstance(net.get_submodule(n), Conv1D) for n in names))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(cast("PreTrainedModel", net), config)
    inner = cast(nn.Module, peft_model.base_model.model)
    targets = [Target(n, inner.get_submodule(n), u) for n, u in names.items()]
    project(targets)
    return peft_model, targets


@torch.no_grad()
def project(targets: list[Target]) -> None:
    """B <- B - u (u . B) for every writer's LoRA: the update B A then adds nothing along u."""
    for t in targets:
        b = t.layer.lora_B[ADAPTER].weight  # (residual width, rank)
        u = t.direction.to(b.device)
        b.copy_((b.double() - u[:, None] * (u @ b.double())[None, :]).to(b.dtype))


@torch.no_grad()
def max_update_along(targets: list[Target]) -> float:
    """The largest |u . (B A)| over every writer's update: 0 up to rounding, by construction."""
    worst = 0.0
    for t in targets:
        b, a = t.layer.lora_B[ADAPTER].weight.double(), t.layer.lora_A[ADAPTER].weight.double()
        worst = max(worst, (t.direction.to(b.device) @ b @ a).abs().max().item())
    return worst


@torch.no_grad()
def _merge(net: nn.Module, targets: list[Target]) -> nn.Module:
    """The base model with W += s B A added in float64 and rounded once; the peft wrappers removed."""
    deltas = {}
    for t in targets:
        b, a = t.layer.lora_B[ADAPTER].weight.double(), t.layer.lora_A[ADAPTER].weight.double()
        deltas[t.name] = t.layer.scaling[ADAPTER] * (b @ a)
    base = cast(Any, net).unload()  # the original modules back, unmerged
    for name, delta in deltas.items():
        module = base.get_submodule(name)
        delta = delta.T if isinstance(module, Conv1D) else delta  # Conv1D stores (in, out)
        module.weight.copy_((module.weight.double() + delta.to(module.weight.device)).to(module.weight.dtype))
    return base


def _save_adapter(net: nn.Module, folder: Path, run: Path) -> None:
    """The LoRA alone, for the edited model in the run folder (PeftModel.from_pretrained(edited, folder))."""
    peft = cast(Any, net)
    peft.peft_config[ADAPTER].base_model_name_or_path = str(run.resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.save_pretrained(str(folder))


def student_logprobs(net: nn.Module, prefixes: list[list[int]], answers: list[list[int]]) -> list[torch.Tensor]:
    """Per sequence, float32 log-probs (answer length, vocab) at the positions predicting each answer token.

    One left-padded forward pass, differentiable (evaluation.damage.teacher_forced scores without gradients).
    """
    device = next(p for p in net.parameters()).device
    seqs = [p + a for p, a in zip(prefixes, answers)]
    width, keep = max(len(s) for s in seqs), max(len(a) for a in answers) + 1
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, width - len(s) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = net(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                 use_cache=False, logits_to_keep=keep).logits  # fmt: skip
    # logits[:, t] is position width - keep + t; the last n tokens are predicted from the n before them
    return [torch.log_softmax(logits[row, keep - len(a) - 1 : keep - 1].float(), -1) for row, a in enumerate(answers)]


@dataclass
class Anchor:
    """The edited model's own first-token distributions after harmful training prompts (top k + tail)."""

    prompt_ids: list[list[int]]
    values: torch.Tensor  # (n, k)
    indices: torch.Tensor
    tail: torch.Tensor  # (n,)


def _anchor(work: Path, net: nn.Module, tokenizer, record: run_record.RunRecord, harmful: list[str],
            options: HealOptions) -> Anchor:  # fmt: skip
    """What the edited model says first after harmful training prompts; the student is held to it (cached)."""
    file = work / "anchor.safetensors"
    if file.is_file():
        tensors = load_file(str(file))
        ids = list(tensors["prompt_ids"].split(tensors["prompt_lengths"].tolist()))
        return Anchor([x.tolist() for x in ids], tensors["values"], tensors["indices"], tensors["tail"])
    prompt_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in _format(tokenizer, record, harmful)]
    values, indices, tail = [], [], []
    with torch.no_grad():  # the LoRA's B is zero here: the student is the edited model
        for start in range(0, len(prompt_ids), options.batch_size):
            chunk = prompt_ids[start : start + options.batch_size]
            for lp in student_logprobs(net, chunk, [[0]] * len(chunk)):  # a dummy token: its position is unused
                top = lp[0].topk(min(options.top_k, lp.shape[-1]))
                values.append(top.values.cpu())
                indices.append(top.indices.cpu())
                tail.append(_log1mexp(torch.logsumexp(top.values, -1)).cpu())
    anchor = Anchor(prompt_ids, torch.stack(values), torch.stack(indices), torch.stack(tail))
    tensors = {"prompt_ids": torch.tensor([x for p in prompt_ids for x in p]),
               "prompt_lengths": torch.tensor([len(p) for p in prompt_ids]),
               "values": anchor.values.contiguous(), "indices": anchor.indices.contiguous(), "tail": anchor.tail}  # fmt: skip
    files.atomic_write(file, lambda tmp: save_file(tensors, tmp))
    return anchor


class _Trainer:
    """The student, its optimizer and the teacher's sequences; steps that stay off the removed direction."""

    def __init__(self, net: nn.Module, targets: list[Target], teacher: Teacher, options: HealOptions, state: dict,
                 anchor: Anchor | None = None):  # fmt: skip
        self.net, self.targets, self.teacher, self.options, self.anchor = net, targets, teacher, options, anchor
        self.params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=options.lr, weight_decay=0.0)
        self.train = list(range(teacher.n_val, len(teacher.prompt_ids)))
        self.val = list(range(teacher.n_val))
        checkpoint = state.pop("checkpoint", None)  # the state file holds no tensors
        if checkpoint is not None:
            self.load_adapter(checkpoint["adapter"], checkpoint["optimizer"])

    def batch(self, step: int) -> list[int]:
        """The training sequences of one step: epochs of seeded permutations, so a resumed run sees the same."""
        n, size = len(self.train), self.options.batch_size
        picked = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.options.seed * 100003 + epoch))
            picked.append(self.train[int(order[offset])])
        return picked

    def kl(self, index: list[int], grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean per-token KL over the sequences (for the gradient), and each sequence's per-token KL."""
        t = self.teacher
        prefixes, answers = [t.prompt_ids[i] for i in index], [t.answer_ids[i] for i in index]
        per: list[torch.Tensor] = [torch.empty(0)] * len(index)
        with torch.set_grad_enabled(grad):
            for row, lp in enumerate(student_logprobs(self.net, prefixes, answers)):
                i = index[row]
                per[row] = topk_kl(lp, t.values[i], t.indices[i], t.tail[i])
            total = torch.cat(per).sum() / sum(len(a) for a in answers)
        return total, per

    def step(self, step: int) -> float:
        """One optimizer step on one batch (plus the anchor's), then the projection; the batch's KL."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.kl(self.batch(step), grad=True)
        total = loss
        if self.anchor is not None and self.options.anchor > 0:
            a, size = self.anchor, self.options.batch_size
            order = torch.randperm(len(a.prompt_ids), generator=torch.Generator().manual_seed(self.options.seed + step))
            picked = order[:size].tolist()
            first = torch.stack([lp[0] for lp in student_logprobs(self.net, [a.prompt_ids[i] for i in picked],
                                                                   [[0]] * len(picked))])  # fmt: skip
            total = total + self.options.anchor * topk_kl(first, a.values[picked], a.indices[picked],
                                                          a.tail[picked]).mean()  # fmt: skip
        total.backward()
        self.optimizer.step()
        project(self.targets)
        return loss.item()

    def validation_kl(self) -> tuple[float, float]:
        """(mean per-token KL, mean first-token KL) over the validation sequences."""
        _, per = self.kl(self.val, grad=False)
        return (sum(p.mean().item() for p in per) / len(per), sum(p[0].item() for p in per) / len(per))

    def adapter(self) -> dict[str, torch.Tensor]:
        """The LoRA weights, on the CPU."""
        return {n: p.detach().cpu().clone().contiguous() for n, p in self.params.items()}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """AdamW's moments and step counts as flat tensors (safetensors holds no nested objects)."""
        flat = {}
        for number, (name, p) in enumerate(self.params.items()):
            for key, value in self.optimizer.state.get(p, {}).items():
                flat[f"{name}::{key}"] = torch.as_tensor(value).detach().cpu().clone().contiguous()
            del number
        return flat

    @torch.no_grad()
    def load_adapter(self, adapter: dict[str, torch.Tensor] | None, optimizer: dict | None = None) -> None:
        """Put saved LoRA weights (and optimizer moments) back; None leaves the adapter at its start (no update)."""
        if adapter is None:
            for t in self.targets:
                t.layer.lora_B[ADAPTER].weight.zero_()
            return
        for name, p in self.params.items():
            p.copy_(adapter[name].to(p.device, p.dtype))
        for name, p in self.params.items():
            moments = {k.split("::", 1)[1]: v.to(p.device) for k, v in (optimizer or {}).items()
                       if k.split("::", 1)[0] == name}  # fmt: skip
            if moments:
                moments["step"] = moments["step"].cpu()
                self.optimizer.state[p] = moments


def _checkpoint(work: Path, trainer: _Trainer, state: dict, best: bool) -> None:
    """Adapter and optimizer, then the state naming them: every file replaced atomically, the state last."""
    adapter = trainer.adapter()
    files.atomic_write(work / "adapter.safetensors", lambda tmp: save_file(adapter, tmp))
    moments = trainer.optimizer_state()
    files.atomic_write(work / "optimizer.safetensors", lambda tmp: save_file(moments, tmp))
    if best:
        files.atomic_write(work / "best.safetensors", lambda tmp: save_file(adapter, tmp))
    _save_state(work, state)


def _save_state(work: Path, state: dict) -> None:
    files.atomic_write_text(work / "state.json", json.dumps(state, indent=1))


def _resume(work: Path, net: nn.Module, options: HealOptions) -> dict:
    """The saved state of an interrupted heal with these settings (tensors attached), or a fresh one."""
    file = work / "state.json"
    if not file.is_file():
        return {"step": 0, "history": []}
    state = json.loads(file.read_text())
    if state["step"] and (work / "adapter.safetensors").is_file():
        state["checkpoint"] = {"adapter": load_file(str(work / "adapter.safetensors")),
                               "optimizer": load_file(str(work / "optimizer.safetensors"))}  # fmt: skip
    return state


def _train(console: Console, trainer: _Trainer, tokenizer, record: run_record.RunRecord, harmful: list[str],
           work: Path, state: dict, edited: Scores, deadline: float) -> str:  # fmt: skip
    """Steps until done, out of time, or refusal rising; checks and checkpoints every check_every steps."""
    options = trainer.options
    limit = edited.refusal_log_odds + options.refusal_margin
    if state["step"]:
        console.print(f"  resuming at step {state['step']} of {options.steps}")
    stopped = "all steps done"
    step_seconds = check_seconds = 0.0
    with progress_bar(console, f"heal ({options.steps} steps, {options.minutes:g} min budget)", options.steps) as bar:
        bar(state["step"])
        while state["step"] < options.steps:
            began = time.time()
            loss = trainer.step(state["step"])
            step_seconds = time.time() - began
            state["step"] += 1
            bar()
            # the end needs one check, judging the answers and saving: stop while that still fits the budget
            reserve = check_seconds + state.get("judge_seconds", 0.0) + 30
            late = time.time() + step_seconds + reserve > deadline
            if state["step"] % options.check_every and state["step"] < options.steps and not late:
                continue
            began = time.time()
            scores = _scores(trainer, tokenizer, record, harmful, options.batch_size)
            check_seconds = time.time() - began
            state["history"].append({"step": state["step"], "loss": loss, **asdict(scores)})
            console.print(
                f"  step {state['step']}: KL {scores.kl:.4f} (edited {edited.kl:.4f}), first-token KL "
                f"{scores.first_token_kl:.4f} (edited {edited.first_token_kl:.4f}), refusal log-odds "
                f"{scores.refusal_log_odds:+.2f} (edited {edited.refusal_log_odds:+.2f})"
            )
            if scores.refusal_log_odds > limit:
                stopped = f"refusal rose at step {state['step']}"
                console.print(f"[yellow]  refusal log-odds rose above {limit:+.2f}; keeping the best checkpoint[/]")
                break
            better = scores.kl < state.get("best", {}).get("scores", {}).get("kl", edited.kl)
            if better:
                state["best"] = {"step": state["step"], "scores": asdict(scores)}
            _checkpoint(work, trainer, state, better)
            if late and state["step"] < options.steps:
                stopped = "time budget"
                break
    return stopped


def _scores(trainer: _Trainer, tokenizer, record: run_record.RunRecord, harmful: list[str], batch_size: int) -> Scores:
    """Validation KL to the original and the refusal log-odds on the harmful validation prompts."""
    kl, first = trainer.validation_kl()
    return Scores(kl, first, _refusal(trainer.net, tokenizer, record, harmful, batch_size))


def _refusal(net: nn.Module, tokenizer, record: run_record.RunRecord, harmful: list[str], batch_size: int) -> float:
    """Mean log-odds of the run's refusal openings after the harmful validation prompts."""
    ids = tuple(record.refusal_tokens.get("ids") or ())
    if not ids:
        return math.nan
    logprobs = model.last_token_logprobs(net, tokenizer, harmful, batch_size)
    return refusal_log_odds(logprobs, ids).mean().item()


def _judged(net: nn.Module, tokenizer, raw: list[str], formatted: list[str], options: HealOptions) -> float | None:
    """Share of greedy answers to the harmful validation prompts that the judge calls refusals."""
    answers = model.generate(net, tokenizer, formatted, options.judge_tokens, options.batch_size)
    verdicts = judge_many(zip(raw, answers))
    return sum(v.label == "refusal" for v in verdicts) / len(verdicts) if verdicts else None
