"""heal: LoRA distillation toward the original that never writes along the removed direction."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import assert_clean_failure, run_cli
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from abliterate import __version__, prompts
from abliterate.apply import apply
from abliterate.architectures import all_layer_writers, architecture_for, get, layers
from abliterate.edit import EditParams, orthogonalize, writer_directions
from abliterate.errors import AbliterateError
from abliterate.heal import HealOptions, _Trainer, heal, topk_kl
from abliterate.model import kl_divergence
from abliterate.output.record import EditInfo, ModelInfo, RunRecord, split_record, write_record
from abliterate.settings import Settings
from abliterate.tiny import save_tiny_checkpoint, tiny_tokenizer

FAST = dict(
    steps=12,
    check_every=4,
    n_prompts=18,
    n_val=6,
    answer_tokens=8,
    judge_tokens=4,
    batch_size=6,
    lr=3e-3,
    refusal_margin=10.0,
)  # the tiny model's refusal log-odds wander; the watchdog has its own test


def load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def tiny_run(tmp_path, scale: float = 1.0, start_layer: int = 0):
    """An original tiny llama and a run folder holding its edit along a random direction, as `run` writes it."""
    original = save_tiny_checkpoint(tmp_path / "original", "llama", tie_word_embeddings=False)
    net = load(original)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direction /= direction.norm()
    params = EditParams(scale, start_layer)
    edited = orthogonalize(net, architecture_for(net), direction, params)
    run = tmp_path / "run"
    net.save_pretrained(run)
    tiny_tokenizer().save_pretrained(run)
    save_file({"direction": direction}, str(run / "directions.safetensors"))
    settings = Settings(n_train=32, n_val=16, n_test=16)
    sets = {"harmful": "harmful", "harmless": "harmless", "benign": "benign_alarming"}
    splits = {key: prompts.split(prompts.load(spec), *((32, 16) if key != "benign" else (0, 0)), 16)
              for key, spec in sets.items()}  # fmt: skip
    split = split_record(settings, splits)  # as `run` records it, so `evaluate` finds the test prompts
    write_record(run, RunRecord(
        abliterate_version=__version__, created="", model=ModelInfo(str(original), "folder"),
        edit=EditInfo.of(params, edited, False), selection={"layer": 1, "position": -1, "reason": "test"},
        settings={"n_train": 32, "n_val": 16, "n_test": 16, "max_new_tokens": 8, "system_prompt": None},
        seed=0, refusal_tokens={"ids": [tiny_tokenizer().convert_tokens_to_ids("I")], "tokens": ["I"]}, split=split,
    ))  # fmt: skip
    return original, run, direction


def writer_outputs_along(net, direction: torch.Tensor) -> float:
    """The largest |u . output| of any writer's Linear on random inputs (u: the direction its edit removed)."""
    arch = architecture_for(net)
    worst = 0.0
    per_layer = zip(layers(net, arch), all_layer_writers(net, arch), writer_directions(net, arch, direction))
    for layer, writers, us in per_layer:
        for writer, u in zip(writers, us):
            module = get(layer, writer.weights[0])  # o_proj, down_proj
            x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(0))
            worst = max(worst, (module(x).double() @ u).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    """One heal of a fully edited tiny run: (original, run, direction, result)."""
    tmp = tmp_path_factory.mktemp("heal")
    original, run, direction = tiny_run(tmp)
    result = heal(str(run), str(tmp / "healed"), HealOptions(**FAST))  # type: ignore[arg-type]
    return original, run, direction, result


def mean_kl(reference, model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        ref = torch.log_softmax(reference(ids).logits.float(), -1)
        out = torch.log_softmax(model(ids).logits.float(), -1)
    return kl_divergence(ref, out).mean().item()


def test_heal_lowers_kl_and_never_writes_along_the_direction(healed):
    original, run, direction, result = healed
    record = json.loads((result.out / "abliteration.json").read_text())
    heal = record["heal"]
    assert heal["rank_1"] is False and heal["writers"] == 6  # o_proj and down_proj of 3 layers
    assert heal["max_update_along_direction"] < 1e-7  # float32 LoRA factors; the updates themselves are ~1e-2
    measured = result.measured
    assert measured["kl_per_token"]["healed"] < 0.7 * measured["kl_per_token"]["edited"]
    assert measured["kl_first_token"]["healed"] < measured["kl_first_token"]["edited"]
    # the full edit left no writer able to write along the direction; the healed model still cannot
    healed_net, edited_net, original_net = load(result.out), load(run), load(original)
    assert writer_outputs_along(edited_net, direction) < 1e-5
    assert writer_outputs_along(healed_net, direction) < 1e-5
    assert writer_outputs_along(original_net, direction) > 1e-2  # the check can fail
    # and it is closer to the original on token sequences it never saw
    ids = torch.randint(6, 256, (4, 24), generator=torch.Generator().manual_seed(7))
    assert mean_kl(original_net, healed_net, ids) < mean_kl(original_net, edited_net, ids)


def test_output_folder_record_and_card(healed):
    _, run, _, result = healed
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "abliteration.json",
                 "directions.safetensors"):  # fmt: skip
        assert (result.out / name).is_file(), name
    record = json.loads((result.out / "abliteration.json").read_text())
    assert record["heal"]["run"] == str(run.resolve())
    assert record["heal"]["settings"]["rank"] == 8 and record["heal"]["steps"] == result.steps
    assert [h["step"] for h in record["heal"]["history"]] == list(range(4, result.steps + 1, 4))
    assert record["split"] == json.loads((run / "abliteration.json").read_text())["split"]  # evaluate's test prompts
    card = (result.out / "README.md").read_text()
    assert "then healed" in card and "| original | abliterated | healed |" in card
    assert not list(result.out.parent.glob(".healed.heal"))  # the checkpoints are gone once the output is in place


def test_apply_refuses_a_healed_record(healed, tmp_path):
    original, _, _, result = healed
    with pytest.raises(AbliterateError, match="healed model.*not a rank-1 edit"):
        apply(str(original), str(result.out / "abliteration.json"), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def test_topk_kl_matches_the_full_kl_when_k_covers_the_vocabulary():
    teacher = torch.log_softmax(torch.randn(5, 40, dtype=torch.float64), -1)
    student = torch.log_softmax(torch.randn(5, 40, dtype=torch.float64), -1)
    full = kl_divergence(teacher, student)
    top = teacher.topk(40, dim=-1)
    tail = torch.full((5,), -80.0, dtype=torch.float64)
    assert torch.allclose(topk_kl(student, top.values, top.indices, tail), full, atol=1e-9)
    top = teacher.topk(8, dim=-1)  # coarser: never more than the full KL
    tail = torch.log1p(-torch.logsumexp(top.values, -1).exp())
    assert (topk_kl(student, top.values, top.indices, tail) <= full + 1e-9).all()


def test_an_interrupted_heal_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    _, run, _ = tiny_run(tmp_path, scale=0.7, start_layer=1)
    out = tmp_path / "healed"
    steps: list[int] = []
    real = _Trainer.step

    def interrupt_at(at: int):
        def step_or_stop(self, step):
            steps.append(step)
            if step == at:
                raise KeyboardInterrupt
            return real(self, step)

        return step_or_stop

    # another learning rate first: its training is dropped below, the original's distributions are kept
    monkeypatch.setattr(_Trainer, "step", interrupt_at(0))
    with pytest.raises(KeyboardInterrupt):
        heal(str(run), str(out), HealOptions(**{**FAST, "lr": 1e-3}))  # type: ignore[arg-type]
    teacher = tmp_path / ".healed.heal" / "teacher.safetensors"
    cached = teacher.stat().st_mtime_ns
    steps.clear()
    monkeypatch.setattr(_Trainer, "step", interrupt_at(6))
    with pytest.raises(KeyboardInterrupt):
        heal(str(run), str(out), HealOptions(**FAST))  # type: ignore[arg-type]
    assert steps == list(range(7)) and teacher.stat().st_mtime_ns == cached
    assert not out.exists()  # nothing half-written
    state = json.loads((tmp_path / ".healed.heal" / "state.json").read_text())
    assert state["step"] == 4  # the last checkpoint
    steps.clear()
    monkeypatch.setattr(_Trainer, "step", lambda self, step: (steps.append(step), real(self, step))[1])
    result = heal(str(run), str(out), HealOptions(**FAST))  # type: ignore[arg-type]
    assert steps == list(range(4, 12)) and result.steps == 12
    assert (out / "model.safetensors").is_file()


def test_adapter_only_and_the_refusal_watchdog(tmp_path):
    from peft import PeftModel

    _, run, direction = tiny_run(tmp_path)
    options = HealOptions(**{**FAST, "refusal_margin": 0.0, "adapter_only": True})  # type: ignore[arg-type]
    result = heal(str(run), str(tmp_path / "adapter"), options)
    # any rise of the refusal log-odds stops training; the checkpoint kept never refuses more than the edit
    assert result.stopped.startswith("refusal rose") and result.steps < 12
    refusal = result.measured["refusal_log_odds"]
    assert refusal["healed"] <= refusal["edited"]
    assert (result.out / "adapter_model.safetensors").is_file() and not (result.out / "model.safetensors").exists()
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(run.resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(load(run), str(result.out)).merge_and_unload()
    assert writer_outputs_along(merged, direction) < 1e-5


def test_bad_input_is_one_line(tmp_path):
    original, run, _ = tiny_run(tmp_path)
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run_cli("heal", str(tmp_path / "empty"), "--out", str(tmp_path / "o")), "no abliteration.json")
    record = json.loads((run / "abliteration.json").read_text())
    record["model"]["spec"] = str(tmp_path / "gone")
    (run / "abliteration.json").write_text(json.dumps(record))
    assert_clean_failure(run_cli("heal", str(run), "--out", str(tmp_path / "o")), "--original")
    assert_clean_failure(run_cli("heal", str(run), "--out", str(run), "--force", "--original", str(original)),
                         "run folder itself")  # fmt: skip
    assert_clean_failure(run_cli("heal", str(run), "--out", str(tmp_path / "o"), "--steps", "0"), "--steps")
    assert not (tmp_path / "o").exists()
