"""Prompt sets: built-in, from files or the hub; deterministic splits; chat formatting."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from abliterate.errors import AbliterateError, require

log = logging.getLogger(__name__)

DATA = Path(__file__).parent / "data"
BUILTIN_SETS = ("harmful", "harmless", "benign_alarming")
# Used when a model has no chat template; documented in the README.
PLAIN_TEMPLATE = "{system}### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass(frozen=True)
class Prompt:
    """One instruction with its category."""

    text: str
    category: str = "uncategorized"


@dataclass(frozen=True)
class PromptSet:
    """A named list of prompts with a content hash for the run record."""

    name: str
    prompts: tuple[Prompt, ...]

    @property
    def sha256(self) -> str:
        """Hash of the texts and categories, in order."""
        digest = hashlib.sha256()
        for p in self.prompts:
            digest.update(f"{p.category}\t{p.text}\n".encode())
        return digest.hexdigest()

    @property
    def texts(self) -> list[str]:
        """The prompt texts."""
        return [p.text for p in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class Split:
    """Disjoint train / validation / test parts of one prompt set."""

    train: PromptSet
    val: PromptSet
    test: PromptSet


PARTS = ("train", "val", "test")  # the fields of Split, in order


def builtin(name: str) -> PromptSet:
    """One of the sets that ship with abliterate (harmful, harmless, benign_alarming)."""
    if name not in BUILTIN_SETS:
        raise AbliterateError(f"no built-in prompt set '{name}'; choose one of {', '.join(BUILTIN_SETS)}")
    return _from_records(name, read_jsonl(DATA / f"{name}.jsonl"), "prompt", "category", DATA / f"{name}.jsonl")


def load(spec: str, column: str = "prompt", category_column: str = "category", split: str = "train") -> PromptSet:
    """A built-in name, a local .txt/.jsonl/.json/.csv/.parquet file, or a hub dataset name."""
    if spec in BUILTIN_SETS:
        return builtin(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return load_file(path, column, category_column)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return load_hub(spec, column, category_column, split)
    raise AbliterateError(f"prompt file {spec} does not exist; pass a .txt, .jsonl, .json, .csv or .parquet file")


def load_file(path: Path, column: str = "prompt", category_column: str = "category") -> PromptSet:
    """Read prompts from a file; only data is read, nothing is executed."""
    if path.is_dir():
        raise AbliterateError(f"{path} is a folder; pass a prompt file")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192] and path.suffix.lower() != ".parquet":
        raise AbliterateError(f"{path} looks binary; pass a UTF-8 text prompt file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            records = [{column: line} for line in raw.decode("utf-8").splitlines()]
        elif suffix == ".jsonl":
            records = read_jsonl(path)
        elif suffix == ".json":
            data = json.loads(raw.decode("utf-8"))
            records = data if isinstance(data, list) else data.get("prompts", data.get("data"))
            if not isinstance(records, list):
                raise ValueError("expected a list of objects or strings")
        elif suffix == ".csv":
            records = list(csv.DictReader(raw.decode("utf-8").splitlines()))
        elif suffix == ".parquet":
            pq = require("pyarrow.parquet", "parquet", "reading .parquet prompt files")
            records = pq.read_table(path).to_pylist()
        else:
            raise AbliterateError(
                f"{path}: unsupported prompt file type '{suffix}'; use .txt, .jsonl, .json, .csv or .parquet"
            )
    except UnicodeDecodeError:
        raise AbliterateError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None
    except (ValueError, json.JSONDecodeError) as exc:
        raise AbliterateError(f"{path} could not be parsed ({exc}); fix the file") from None
    records = [{column: r} if isinstance(r, str) else r for r in records]
    return _from_records(path.stem, records, column, category_column, path)


def load_hub(name: str, column: str = "prompt", category_column: str = "category", split: str = "train") -> PromptSet:
    """A dataset from the Hugging Face hub (needs the optional `datasets` package and internet)."""
    try:
        import datasets
    except ImportError:
        raise AbliterateError("loading prompts from the hub needs `pip install abliterate[hub]`") from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth and missing-dataset errors all end here
        raise AbliterateError(f"could not load dataset '{name}' from the hub: {str(exc).splitlines()[0]}") from None
    return _from_records(name, list(rows), column, category_column, name)


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """JSON objects, one per non-empty line; a bad line or a missing field is a one-line error naming it."""
    if not path.is_file():
        raise AbliterateError(f"{path} does not exist; pass a .jsonl file")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AbliterateError(f"{path}:{number} is not valid JSON ({exc.msg}); fix that line") from None
        if required and not (isinstance(record, dict) and all(k in record for k in required)):
            raise AbliterateError(f"{path}:{number} needs a JSON object with {', '.join(required)}; fix that line")
        records.append(record)
    return records


def _from_records(name: str, records: list, column: str, category_column: str, where) -> PromptSet:
    prompts = []
    for record in records:
        if not isinstance(record, dict) or column not in record:
            raise AbliterateError(
                f"{where}: a record has no '{column}' field; name the prompt column with --prompt-column"
            )
        text = str(record[column] or "").strip()
        if text:
            prompts.append(Prompt(text, str(record.get(category_column) or "uncategorized")))
    if not prompts:
        raise AbliterateError(f"{where} contains no prompts; give a file with at least one non-empty prompt")
    return PromptSet(name, tuple(prompts))


def split(prompts: PromptSet, n_train: int, n_val: int, n_test: int, seed: int = 0) -> Split:
    """Shuffle with the seed and cut into train / val / test; the same seed gives the same split."""
    if n_train + n_val + n_test > len(prompts):
        raise AbliterateError(
            f"prompt set '{prompts.name}' has {len(prompts)} prompts but {n_train}+{n_val}+{n_test} were asked for; "
            "lower --n-train/--n-val/--n-test or give a larger file"
        )
    order = list(prompts.prompts)
    random.Random(seed).shuffle(order)
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val : n_train + n_val + n_test])
    names = ("train", "val", "test")
    return Split(*(PromptSet(f"{prompts.name}:{n}", tuple(p)) for n, p in zip(names, parts)))


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def supports_thinking(tokenizer) -> bool:
    """Whether the chat template has an `enable_thinking` switch (Qwen3, SmolLM3: answers open with reasoning)."""
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, dict) else [template or ""]
    return any("enable_thinking" in t for t in texts)


def format_prompt(tokenizer, prompt: str, system_prompt: str | None = None, thinking: bool = False) -> str:
    """The prompt as the model sees it before its answer begins; reasoning off where the template can turn it off."""
    if has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        # A reasoning block would open every answer and hide the refusal from the first-token score.
        extra = {"enable_thinking": False} if not thinking and supports_thinking(tokenizer) else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    system = f"{system_prompt}\n\n" if system_prompt else ""
    return PLAIN_TEMPLATE.format(system=system, prompt=prompt)


def format_all(tokenizer, prompts: list[str], system_prompt: str | None = None, thinking: bool = False) -> list[str]:
    """format_prompt over a list, warning once if the model has no chat template."""
    if not has_chat_template(tokenizer):
        log.warning("the model has no chat template; using the plain '### Instruction / ### Response' format")
    return [format_prompt(tokenizer, p, system_prompt, thinking) for p in prompts]
