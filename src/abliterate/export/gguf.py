"""Write a saved model folder as a GGUF file that llama.cpp, Ollama, LM Studio and transformers load.

The `gguf` package writes the container but converts nothing, so this module does what llama.cpp's
converter does for the architectures we support: tensor names (from gguf's own name map),
llama's q/k row permutation, hyperparameters from config.json, the byte-level BPE vocabulary,
merges, special tokens and chat template. When the run started from a GGUF, that file's metadata
and vocabulary are kept and only what this file changes (file type, hyperparameters) is rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abliterate import __version__
from abliterate.errors import AbliterateError
from abliterate.output import record as run_record

log = logging.getLogger(__name__)

TYPES = ("f16", "bf16", "q8_0")
# transformers model_type -> GGUF architecture; each is one transformers can also load back
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_QK = {"llama"}  # llama.cpp interleaves the rotary halves of q/k rows for these
MARKER_KEY = "abliterate.version"  # written into every exported file, so --force can tell our files from others
K_QUANT = re.compile(r"^(i?q\d+_k(_[sml])?|iq\d.*|tq\d.*)$", re.IGNORECASE)

# the keys the new file decides, whatever the source GGUF said
_DROPPED_SOURCE_KEYS = {
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
}


@dataclass(frozen=True)
class Value:
    """One metadata value with its GGUF type (sub_type for arrays)."""

    value: Any
    type: Any
    sub_type: Any = None


def check_type(kind: str) -> str:
    """The normalized output type, or a one-line error (K-quants get their own explanation)."""
    k = kind.lower()
    if k in TYPES:
        return k
    if K_QUANT.match(k):
        raise AbliterateError(
            f"--type {kind}: the gguf package cannot write K-quants; export f16, bf16 or q8_0 and run "
            "llama.cpp's llama-quantize on the file for K-quants"
        )
    raise AbliterateError(f"unknown --type {kind}; use one of {', '.join(TYPES)}")


def export_gguf(folder: str | Path, out: str | Path, kind: str = "f16", source_gguf: str | Path | None = None,
                force: bool = False) -> Path:  # fmt: skip
    """Write the HF model folder `folder` (as `abliterate run` saves it) as the GGUF file `out`."""
    from abliterate.files import atomic_write, check_output

    kind = check_type(kind)
    folder, out = Path(folder).expanduser(), check_output(out, force, "gguf", is_ours)
    if not (folder / "config.json").is_file():
        raise AbliterateError(f"{folder} is not a model folder (no config.json); pass the --out folder of a run")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in ARCHS:
        raise AbliterateError(
            f"GGUF export supports model types {', '.join(ARCHS)}; {folder} is {config.get('model_type')!r}"
        )
    arch = ARCHS[config["model_type"]]
    _check_config(config)
    plan = _tensor_plan(_weight_files(folder), config, arch, kind)
    vocab_rows = next(t.shape[0] for t in plan if t.name == "token_embd.weight")
    keys = _metadata(folder, config, arch, kind, vocab_rows, source_gguf)
    check_output(out, force, "gguf", is_ours)  # again: the file may have appeared while the tensors were planned
    try:
        atomic_write(out, lambda tmp: _write(Path(tmp), arch, keys, plan))
    except OSError as exc:
        raise AbliterateError(
            f"could not write {out}: {exc.strerror or exc}; free disk space or pick another --out"
        ) from None
    return out


@dataclass(frozen=True)
class Planned:
    """One tensor of the output: where it comes from and how it is stored."""

    name: str  # GGUF name
    file: Path
    hf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None  # llama's q/k: heads to interleave the rotary halves of


def _metadata(folder: Path, config: dict, arch: str, kind: str, vocab_rows: int,
              source_gguf: str | Path | None) -> dict[str, Value]:  # fmt: skip
    """Every key of the new file: hyperparameters, names, tokenizer, and whatever the source GGUF adds."""
    import gguf

    keys = {**_hyperparameters(config, arch), **_general(folder)}
    source = _source_gguf(folder, source_gguf)
    source_keys = _source_keys(source, arch, vocab_rows) if source else {}
    if not any(k.startswith("tokenizer.") for k in source_keys):
        keys.update(_tokenizer_keys(folder, vocab_rows))
    # the source's metadata wins except where this file differs from it: sizes and tensor types
    keys.update({k: v for k, v in source_keys.items() if not k.startswith(f"{arch}.") or k not in keys})
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]  # fmt: skip
    keys["general.file_type"] = Value(int(file_type), gguf.GGUFValueType.UINT32)
    keys["general.quantization_version"] = Value(gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32)
    keys[MARKER_KEY] = Value(__version__, gguf.GGUFValueType.STRING)
    return keys


def _write(path: Path, arch: str, keys: dict[str, Value], plan: list[Planned]) -> None:
    """Header, metadata and tensor table first, then one tensor at a time, so memory stays at one tensor."""
    import gguf

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # mkstemp made it private; a model file should not be
    writer = gguf.GGUFWriter(path, arch)
    try:
        for key, v in keys.items():
            writer.add_key_value(key, v.value, v.type, v.sub_type)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(_encode(t))
    finally:
        writer.close()


def _check_config(config: dict) -> None:
    """Refuse what a GGUF of these architectures cannot express (the loaders would silently differ)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise AbliterateError(f"GGUF export does not write rope scaling ({rope_type}); this model needs it")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise AbliterateError("GGUF export of models with attention_bias or mlp_bias set is not supported")
    if config.get("use_sliding_window"):
        raise AbliterateError("GGUF export of models with sliding-window attention is not supported")


def _weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of the model (not directions.safetensors)."""
    from safetensors import safe_open

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise AbliterateError(f"{folder} has no model*.safetensors; pass the --out folder of a run")
    names = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            names.update({name: file for name in f.keys()})
    return names


def _tensor_plan(weights: dict[str, Path], config: dict, arch: str, kind: str) -> list[Planned]:
    """Every tensor of the output, token embeddings first, named by gguf's own map for the architecture."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    shapes = {}
    for file in set(weights.values()):
        with safe_open(str(file), "pt") as f:
            shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()})
    plan = []
    for hf_name in sorted(weights, key=_layer_order):
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AbliterateError(f"tensor {hf_name} has no GGUF name for {arch}; this checkpoint cannot be exported")
        permute = None
        if arch in PERMUTED_QK and re.search(r"\.attn_[qk]\.weight$", name):
            permute = heads if ".attn_q." in name else kv_heads
        shape = shapes[hf_name]
        plan.append(Planned(name, weights[hf_name], hf_name, shape, _ggml_type(shape, kind), permute))
    found = {t.name for t in plan}
    for needed in ("token_embd.weight",) + (() if tied else ("output.weight",)):
        if needed not in found:
            raise AbliterateError(f"the checkpoint has no tensor for {needed}; the folder is incomplete")
    return plan


def _layer_order(hf_name: str) -> tuple:
    """Embeddings first, then layers by number, then the rest."""
    m = re.search(r"\.layers\.(\d+)\.", hf_name)
    if "embed_tokens" in hf_name:
        return (0, 0, hf_name)
    return (1, int(m.group(1)), hf_name) if m else (2, 0, hf_name)


def _ggml_type(shape: tuple, kind: str):
    """Vectors (norms, biases) stay float32, as llama.cpp expects; matrices take the asked type."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32
    if kind == "q8_0":
        # a row that does not split into 32-value blocks cannot be Q8_0; llama.cpp falls back to F16 too
        return T.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0 else T.F16
    return {"f16": T.F16, "bf16": T.BF16}[kind]


def _nbytes(shape: tuple, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _encode(t: Planned) -> np.ndarray:
    """The tensor's bytes in the file's type; q/k rows permuted first where the architecture needs it."""
    import gguf
    from safetensors import safe_open

    with safe_open(str(t.file), "pt") as f:
        tensor = f.get_tensor(t.hf_name)
    if t.permute_heads:
        tensor = permute_qk(tensor, t.permute_heads)
    data = np.ascontiguousarray(tensor.float().numpy())
    if t.qtype == gguf.GGMLQuantizationType.F16 and np.abs(data).max(initial=0) > np.finfo(np.float16).max:
        raise AbliterateError(f"{t.hf_name} has values beyond float16's range; export with --type bf16")
    return gguf.quants.quantize(data, t.qtype)


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores each head's rotary pairs as two halves; llama.cpp's llama wants them interleaved."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _hyperparameters(config: dict, arch: str) -> dict[str, Value]:
    """The {arch}.* keys llama.cpp and transformers read, from config.json."""
    import gguf

    U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    keys = {
        "context_length": Value(config["max_position_embeddings"], U32),
        "embedding_length": Value(config["hidden_size"], U32),
        "feed_forward_length": Value(config["intermediate_size"], U32),
        "block_count": Value(config["num_hidden_layers"], U32),
        "attention.head_count": Value(heads, U32),
        "attention.head_count_kv": Value(config.get("num_key_value_heads") or heads, U32),
        "attention.layer_norm_rms_epsilon": Value(float(config["rms_norm_eps"]), F32),
        "rope.freq_base": Value(float(theta), F32),
        "vocab_size": Value(config["vocab_size"], U32),
        "rope.dimension_count": Value(head_dim, U32),
    }
    if head_dim != config["hidden_size"] // heads or arch == "qwen3":
        keys["attention.key_length"] = Value(head_dim, U32)
        keys["attention.value_length"] = Value(head_dim, U32)
    return {f"{arch}.{k}": v for k, v in keys.items()}


def _general(folder: Path) -> dict[str, Value]:
    """general.* keys for a model that did not come from a GGUF: its name and, where known, base model."""
    import gguf

    S = gguf.GGUFValueType.STRING
    base = run_record.load_record(folder).model.base_model if (folder / run_record.RECORD).is_file() else None
    keys = {"general.type": Value("model", S), "general.name": Value(base or folder.resolve().name, S)}
    if base:
        keys["general.base_model.count"] = Value(1, gguf.GGUFValueType.UINT32)
        keys["general.base_model.0.name"] = Value(base, S)
        keys["general.base_model.0.repo_url"] = Value(f"https://huggingface.co/{base}", S)
    return keys


def _tokenizer_keys(folder: Path, vocab_rows: int) -> dict[str, Value]:
    """tokenizer.* keys for a byte-level BPE tokenizer, read from the folder's HF tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    V = gguf.GGUFValueType
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        spec = json.loads(tok.backend_tokenizer.to_str())
    except (OSError, ValueError, AttributeError) as exc:
        raise AbliterateError(
            f"{folder} has no usable fast tokenizer ({exc}); save the tokenizer with the model"
        ) from None
    model = spec.get("model", {})
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (spec.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise AbliterateError(
            "GGUF export writes byte-level BPE vocabularies only; this tokenizer is not one "
            "(pass --source-gguf with the GGUF the model came from to reuse its vocabulary)"
        )
    merges = [
        m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m) for m in model.get("merges", [])
    ]
    if not merges:
        raise AbliterateError(
            "the tokenizer has no BPE merges, which llama.cpp requires; save the model's real tokenizer"
        )
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_rows:
        raise AbliterateError(f"the tokenizer has ids beyond the model's {vocab_rows} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_rows):
        if i not in by_id:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    keys = {
        "tokenizer.ggml.model": Value("gpt2", V.STRING),
        "tokenizer.ggml.pre": Value(_pre_tokenizer(spec.get("pre_tokenizer")), V.STRING),
        "tokenizer.ggml.tokens": Value(tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": Value([int(t) for t in types], V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": Value(merges, V.ARRAY, V.STRING),
    }
    for key, token_id in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unknown", tok.unk_token_id),
                          ("padding", tok.pad_token_id)):  # fmt: skip
        if token_id is not None:
            keys[f"tokenizer.ggml.{key}_token_id"] = Value(int(token_id), V.UINT32)
    # what the tokenizer really does to plain text, rather than what its config claims
    ids = tok("a").input_ids
    keys["tokenizer.ggml.add_bos_token"] = Value(bool(ids) and ids[0] == tok.bos_token_id, V.BOOL)
    keys["tokenizer.ggml.add_eos_token"] = Value(bool(ids) and ids[-1] == tok.eos_token_id, V.BOOL)
    if isinstance(tok.chat_template, str):
        keys["tokenizer.chat_template"] = Value(tok.chat_template, V.STRING)
    return keys


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE (its regex), or 'default'."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == pattern:
                return name
    log.warning(
        "unrecognised pre-tokenizer %s; the GGUF says 'default' and llama.cpp may split text differently", kinds
    )
    return "default"


def _source_gguf(folder: Path, explicit: str | Path | None) -> Path | None:
    """The GGUF the model was made from: --source-gguf, or what abliteration.json records, if still on disk."""
    from abliterate import offline

    spec, sha = "", None
    if (folder / run_record.RECORD).is_file():
        rec = run_record.load_record(folder)
        applied = rec.applied_to or {}
        spec, sha = str(applied.get("source") or rec.model.spec), applied.get("sha256", rec.model.sha256)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise AbliterateError(f"--source-gguf {path} does not exist; check the path")
    elif spec in offline.BUILTIN_MODELS:
        m = offline.BUILTIN_MODELS[spec]
        path = offline.model_dir(m) / m.gguf_name
    elif spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
    else:
        return None
    if not path.is_file():
        log.warning("the run's source GGUF %s is gone; its metadata is not copied (pass --source-gguf)", path)
        return None
    if sha and offline.sha256_file(path) != sha:
        if explicit:
            raise AbliterateError(
                f"{path} is not the GGUF this model was made from (sha256 differs from abliteration.json)"
            )
        log.warning("%s changed since the run (sha256 differs); its metadata is not copied", path)
        return None
    return path


def _source_keys(path: Path, arch: str, vocab_rows: int) -> dict[str, Value]:
    """Every metadata key of the source GGUF that the new file keeps."""
    try:
        fields = read_metadata(path)
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise AbliterateError(f"{path} is a corrupt GGUF ({exc}); pass the GGUF the model was made from") from None
    source_arch = fields.get("general.architecture", Value(None, None)).value
    if source_arch != arch:
        raise AbliterateError(f"{path} is a {source_arch} GGUF but the model is {arch}; pass the GGUF it was made from")
    keys = {k: v for k, v in fields.items() if not k.startswith("split.") and k not in _DROPPED_SOURCE_KEYS}
    tokens = keys.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.value) != vocab_rows:
        log.warning("%s has %d tokens but the model %d rows; writing the folder's tokenizer instead",
                    path, len(tokens.value), vocab_rows)  # fmt: skip
        keys = {k: v for k, v in keys.items() if not k.startswith("tokenizer.")}
    return keys


# GGUF value type -> struct format, for the fixed-size types
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_metadata(path: Path) -> dict[str, Value]:
    """A GGUF's key-value metadata with its types. gguf.GGUFReader gives the same but takes ~15 s on a
    50k-token vocabulary, because it maps every string separately; this reads the header alone."""
    import mmap

    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            raise ValueError("bad magic bytes")
        version, _, n_kv = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        pos, fields = 24, {}

        def string(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", blob, pos)
            return blob[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n

        def value(kind: int, pos: int) -> tuple[Any, int]:
            if kind == 8:
                return string(pos)
            if kind == 9:
                sub, count = struct.unpack_from("<IQ", blob, pos)
                pos, items = pos + 12, []
                for _ in range(count):
                    item, pos = value(sub, pos)
                    items.append(item)
                return items, pos
            fmt = _FORMATS.get(kind)
            if fmt is None:
                raise ValueError(f"unknown value type {kind}")
            return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)

        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", blob, pos)
            sub = struct.unpack_from("<I", blob, pos + 4)[0] if kind == 9 else None
            val, pos = value(kind, pos + 4)
            if kind == 9 and (not val or sub == 9):
                continue  # empty or nested arrays: gguf cannot write them back, and llama.cpp needs none
            fields[key] = Value(val, gguf.GGUFValueType(kind), None if sub is None else gguf.GGUFValueType(sub))
        return fields


def is_ours(path: Path) -> bool:
    """A GGUF written by export-gguf: it carries the abliterate.version key."""
    try:
        return MARKER_KEY in read_metadata(path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return False
