"""One typed settings object; CLI flags, ABLITERATE_* environment variables and TOML all fill it."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from abliterate.errors import AbliterateError


def _opt(default, help: str, **extra):
    """A setting: its default, its --help text, and extras (positional=True; feeds=STAGE: part of that cache key)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded: one flag group that run, evaluate, chat, apply and export-adapter share."""

    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    max_memory: str = "auto"  # above it, `run` streams decoder layers from disk one at a time


LOAD = LoadOptions()


@dataclass
class Settings:
    """Everything a run depends on; recorded whole in abliteration.json."""

    model: str = _opt("qwen2.5-coder-0.5b-instruct", "built-in name, HF folder, .gguf file or hub id", positional=True)
    out: str = _opt("", "output folder for the abliterated model")
    push_to_hub: str | None = _opt(
        None, "upload the finished output folder to this hub repo (owner/name); token from HF_TOKEN"
    )
    harmful: str = _opt("harmful", "harmful prompts: built-in set name, file or hub dataset")
    harmless: str = _opt("harmless", "harmless prompts: built-in set name, file or hub dataset")
    benign: str = _opt("benign_alarming", "benign prompts with alarming words, for over-refusal")
    prompt_column: str = _opt("prompt", "column holding the prompt in .jsonl/.json/.csv/.parquet/hub data")
    category_column: str = _opt("category", "optional column holding each prompt's category")
    system_prompt: str | None = _opt(
        None, "system prompt for every conversation (default: the template's)", feeds="collect"
    )
    force: bool = _opt(False, "replace the output folder if it is empty or an earlier abliterate output")
    layer: int | None = _opt(None, "use the direction from this layer instead of selecting one", feeds="select")
    max_kl: float = _opt(
        0.1,
        "first-token KL budget: selection requires mean KL + 1.645 standard errors on the harmless validation "
        "prompts <= max_kl * kl_margin (other prompts can come out higher)",
        feeds="select",
    )
    kl_margin: float = _opt(0.75, "the KL budget held on validation prompts is max_kl * kl_margin", feeds="select")
    top_k: int = _opt(
        4, "best candidates whose edit strength is searched (past them, only until one qualifies)", feeds="select"
    )
    skip_last_layers: float = _opt(0.2, "share of the last layers never chosen", feeds="select")
    positions: int = _opt(1, "candidates at the last N prompt positions", feeds="collect")
    induce: bool = _opt(False, "strengthen the refusal direction instead of removing it", feeds="select")
    search: bool = _opt(
        False,
        "search the edit space (direction layer, how many directions, per-layer strengths of attention and MLP "
        "writers, embeddings, norm preservation) for a "
        "Pareto front of refusal, over-refusal and KL instead of selecting on the strength ladder (abliterate[search])",
    )
    max_directions: int = _opt(
        1,
        "the search removes up to this many directions at once: the mean difference, then the harmful prompts' "
        "principal directions around it (1: one direction; docs/results.md has why that is the default)",
    )
    trials: int = _opt(60, "edits the search measures, all workers together; more continue the same study")
    search_minutes: float = _opt(0.0, "stop the search after this many minutes (0: when --trials are done)")
    verify: int = _opt(
        3, "searched edits within the KL budget whose whole greedy answers are judged before the choice (0: none)"
    )
    verify_tokens: int = _opt(100, "tokens per answer for that check: long enough for a delayed refusal to count")
    storage: str | None = _opt(
        None,
        "Optuna storage of the search (default: a SQLite file in the cache); a URL such as "
        "postgresql://user@host/db lets `abliterate search-worker` processes on other machines join",
    )
    study: str | None = _opt(None, "name of the search study (default: one derived from the model, prompts, settings)")
    thinking: bool = _opt(False, "keep the model's reasoning block on (by default templates that can turn it off do)")
    norm_preserving: bool = _opt(
        False, "after the edit, rescale every vector a writer adds to the residual stream to its original length"
    )
    project_harmless_mean: bool = _opt(
        False, "remove each direction's component along the harmless mean", feeds="select"
    )
    dtype: str = _opt(
        LOAD.dtype,
        "compute dtype for the forward passes: auto (float32 on CPU, bfloat16 on accelerators), float32, "
        "bfloat16, float16, float64; the saved weights do not pass through it",
    )
    save_dtype: str = _opt(
        "source",
        "dtype of the saved weights: source (the checkpoint's own; float32 for GGUF), float32, bfloat16, "
        "float16, float64; the edit is computed in float64 and rounded once to it",
    )
    device: str = _opt(LOAD.device, "auto, cpu, cuda, cuda:N or mps")
    max_memory: str = _opt(
        LOAD.max_memory,
        "memory the model may take (a size such as 6GB; auto: 80 percent of the free memory); a safetensors model "
        "whose weights in the compute dtype need more is layer-streamed: one decoder layer in memory at a time "
        "(run: collect, select, --search and the save; needs --no-eval)",
    )
    load_in_4bit: bool = _opt(
        False, "collect and select on a bitsandbytes 4-bit copy (CUDA only); edit full-precision weights"
    )
    batch_size: int = _opt(16, "prompts per forward pass")
    max_new_tokens: int = _opt(96, "tokens generated per answer for evaluation")
    kl_tokens: int = _opt(32, "tokens of the original's greedy harmless answers scored for multi-token KL")
    n_train: int = _opt(128, "prompts of each kind for the mean difference")
    n_val: int = _opt(32, "prompts of each kind for selection")
    n_test: int = _opt(64, "held-out harmful and benign prompts for evaluation")
    seed: int = _opt(0, "seed for splits and anything random")
    no_eval: bool = _opt(False, "skip the before/after generation (faster; no refusal rates)")
    trust_remote_code: bool = _opt(LOAD.trust_remote_code, "allow model code from the hub to run")
    allow_pickle: bool = _opt(LOAD.allow_pickle, "allow loading pickle (.bin) checkpoints")
    config: str | None = _opt(None, "TOML file with any of these settings")

    def as_dict(self) -> dict:
        """All settings as plain values."""
        return dataclasses.asdict(self)

    def load_options(self) -> LoadOptions:
        """The load flag group of this run."""
        return LoadOptions(self.dtype, self.device, self.trust_remote_code, self.allow_pickle, self.max_memory)

    def feeding(self, stage: str) -> dict:
        """The settings a cached stage's result depends on (those declared with feeds=stage), by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("feeds") == stage}


def _base_type(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else tp


def field_types() -> dict[str, type]:
    """Each setting's type, Optional unwrapped: what a flag or a TOML value is converted to."""
    hints = typing.get_type_hints(Settings)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(Settings)}


def _coerce(name: str, value, kind: type, where: str):
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise AbliterateError(f"{where}: '{name}' must be {kind.__name__}, got {value!r}") from None


def resolve(cli: dict) -> Settings:
    """Defaults, then the TOML file, then ABLITERATE_* variables, then CLI flags."""
    types_ = field_types()
    values: dict = {}
    config_path = cli.get("config") or os.environ.get("ABLITERATE_CONFIG")
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise AbliterateError(f"config file {path} does not exist; check --config")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise AbliterateError(f"config file {path} is not valid TOML ({exc}); fix it") from None
        unknown = sorted(set(data) - set(types_))
        if unknown:
            raise AbliterateError(f"config file {path} has unknown settings {unknown}; see `abliterate run --help`")
        values.update({k: _coerce(k, v, types_[k], str(path)) for k, v in data.items()})
    for name, kind in types_.items():
        env = os.environ.get(f"ABLITERATE_{name.upper()}")
        if env is not None:
            values[name] = _coerce(name, env, kind, f"ABLITERATE_{name.upper()}")
    values.update({k: v for k, v in cli.items() if k in types_ and v is not None})
    return Settings(**values)
