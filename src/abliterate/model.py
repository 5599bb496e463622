"""Load a model and tokenizer from a built-in name, an HF folder, a GGUF file or a hub id."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import nn

from abliterate import forward, offline
from abliterate.architectures import Architecture, architecture_for, input_embeddings
from abliterate.errors import AbliterateError
from abliterate.settings import LoadOptions

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedTokenizerBase

SourceKind = Literal["builtin", "folder", "gguf", "hub"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from what the user typed."""

    spec: str
    kind: SourceKind
    path: Path | None = None  # folder to load from (for gguf: the folder holding the file)
    gguf_file: str | None = None
    base_model: str | None = None  # hub id of the original model, for the card
    license: str | None = None
    sha256: str | None = None  # of the GGUF file, where there is one


@dataclass
class LoadedModel:
    """A model ready for forward passes, with what the later stages need to know about it."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    arch: Architecture
    source_dtype: torch.dtype
    options: LoadOptions = LoadOptions()  # how it was loaded, so the source can be loaded again to save the edit

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where inputs go)."""
        return input_embeddings(self.model).weight.device


def check_gguf(path: Path) -> None:
    """Fail with a one-line error if a file is not a complete GGUF."""
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise AbliterateError(f"{path} is not a GGUF file (bad magic bytes); pass a .gguf model file")
    try:
        reader = gguf.GGUFReader(path)
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError("tensor data runs past the end of the file")
    except Exception as exc:  # gguf raises many kinds of errors on a damaged file
        raise AbliterateError(f"{path} is a corrupt or truncated GGUF ({exc}); download it again") from None


def resolve(spec: str, allow_pickle: bool = False) -> ModelSource:
    """Turn a model argument into a ModelSource without loading anything."""
    if spec in offline.BUILTIN_MODELS:
        m = offline.BUILTIN_MODELS[spec]
        return ModelSource(spec, "builtin", offline.model_dir(m), m.gguf_name, m.hub_id, m.license, m.sha256)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise AbliterateError(f"GGUF file {path} does not exist; check the path")
        check_gguf(path)
        base, license_ = _gguf_origin(path)
        return ModelSource(spec, "gguf", path.parent.resolve(), path.name, base, license_, offline.sha256_file(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise AbliterateError(
                f"{path} has no config.json; pass a Hugging Face model folder, a .gguf file or a model name"
            )
        _check_weights_format(path, allow_pickle)
        base = _base_model_of(path)
        return ModelSource(spec, "folder", path.resolve(), base_model=base)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_like_path:
        names = ", ".join(offline.BUILTIN_MODELS)
        raise AbliterateError(
            f"model '{spec}' is neither a local path nor a built-in model ({names}) nor a hub id (owner/name)"
        )
    return ModelSource(spec, "hub", base_model=spec)


def _gguf_origin(path: Path) -> tuple[str | None, str | None]:
    """(hub id it was converted from, license), where the GGUF's metadata records them."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    text = lambda key: str(fields[key].contents()) if key in fields else None  # noqa: E731
    base = None
    for key in ("general.base_model.0.repo_url", "general.source.huggingface.repository", "general.source.url"):
        tail = (text(key) or "").split("huggingface.co/")[-1].strip("/")
        if tail.count("/") == 1:
            base = tail
            break
    return base, text("general.license")


def _base_model_of(folder: Path) -> str | None:
    """The hub id a folder's config names, if any (output.record.base_model also reads a run's record)."""
    name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    return name if name and name.count("/") == 1 and not Path(name).exists() else None


def pick_device(device: str) -> str:
    """'auto' means CUDA, then MPS, then CPU; an explicit device must exist here."""
    if device != "auto":
        kind, _, index = device.partition(":")
        if kind == "cuda" and not torch.cuda.is_available():
            raise AbliterateError(f"--device {device}: no CUDA GPU is usable here; use --device cpu or auto")
        if kind == "cuda" and index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise AbliterateError(
                f"--device {device}: there are {torch.cuda.device_count()} CUDA devices; use cuda:0 to cuda:N-1"
            )
        if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise AbliterateError(f"--device {device}: Apple MPS is not available here; use --device cpu or auto")
        if kind not in ("cpu", "cuda", "mps"):
            raise AbliterateError(f"unknown --device {device!r}; use auto, cpu, cuda, cuda:N or mps")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' computes in float32 on CPU (exact and fast enough) and bfloat16 on accelerators."""
    if dtype == "source":
        raise AbliterateError("dtype 'source' is a save dtype; for computing use auto, " + ", ".join(DTYPES))
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise AbliterateError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def save_dtype(name: str, source_dtype: torch.dtype) -> torch.dtype:
    """The dtype to save in: 'source' (or 'auto') keeps the checkpoint's own, else the named one."""
    if name in ("source", "auto"):
        return source_dtype
    if name not in DTYPES:
        raise AbliterateError(f"unknown save dtype '{name}'; use source or one of {', '.join(DTYPES)}")
    return DTYPES[name]


# quantization_config methods whose weights transformers hands over already dequantized.
DEQUANTIZED_ON_LOAD = {"gguf"}


def check_not_quantized(config, spec: str) -> None:
    """Refuse a pre-quantized checkpoint: its layers hold codes and scales, which the float64 edit would corrupt."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = str(getattr(method, "value", method) or "unknown").lower()
    if method not in DEQUANTIZED_ON_LOAD:
        raise AbliterateError(
            f"{spec} is a pre-quantized checkpoint ({method}); abliterate edits float weights only: use the "
            "model's unquantized (float16, bfloat16 or float32) checkpoint (a GGUF file also works)"
        )


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor in a folder's safetensors, for configs that declare none."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                    if dtype is not None:
                        return dtype
        except Exception:  # an unreadable file is for the loader to report
            return None
    return None


def load(
    spec: str | ModelSource,
    options: LoadOptions = LoadOptions(),
    progress: Callable[[str], None] = print,
    load_in_4bit: bool = False,
    streamable: bool = False,
) -> LoadedModel:
    """Load model and tokenizer; built-in models are fetched and their dequantized weights cached.

    dtype 'source' loads the checkpoint's own dtype (float32 for GGUF and built-in models): the
    weights exactly as stored, for an edit that is saved. load_in_4bit quantizes the linear layers
    with bitsandbytes (CUDA only): good enough to collect and select, but such a model cannot be
    edited or saved. A checkpoint that is already quantized (FP8, bitsandbytes, GPTQ, AWQ, ...) is refused.
    With `streamable`, a safetensors model bigger than options.max_memory is layer-streamed (see forward.py):
    forward passes work, weight edits do not.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype, device, trust_remote_code, allow_pickle = (
        options.dtype,
        options.device,
        options.trust_remote_code,
        options.allow_pickle,
    )
    if load_in_4bit:
        check_4bit(device)
    device = pick_device(device)
    source = spec if isinstance(spec, ModelSource) else resolve(spec, allow_pickle)
    spec = source.spec
    if dtype != "source":
        pick_dtype(dtype, device)  # an unknown dtype fails before anything is fetched
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if device == "cuda" and torch.cuda.device_count() > 1:
        kwargs["device_map"] = "auto"  # accelerate spreads the layers over the GPUs
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs.setdefault("device_map", {"": device})  # a quantized model is placed while loading, never moved

    where: str | Path
    if source.kind == "builtin":
        builtin = offline.BUILTIN_MODELS[spec]
        hf_dir = offline.dequantized_dir(builtin)
        if not (hf_dir / "config.json").exists():
            gguf_path = offline.fetch(builtin, progress)
            progress(f"dequantizing {gguf_path.name} once; later runs load the cached weights")
            _cache_dequantized(gguf_path, hf_dir)
        where, file = hf_dir, None
    elif source.kind == "gguf":
        assert source.path is not None  # resolve() gives every local source its folder
        where, file = source.path, source.gguf_file
    elif source.kind == "folder":
        assert source.path is not None
        where, file = source.path, None
    else:
        where, file = source.spec, None

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file, trust_remote_code=trust_remote_code)
        # Read before loading: from_pretrained overwrites config.dtype with the compute dtype.
        declared = None
        if not file:
            config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
            check_not_quantized(config, spec)
            declared = _config_dtype(config) or (_stored_dtype(Path(where)) if Path(where).is_dir() else None)
        stored = torch.float32 if source.kind in ("builtin", "gguf") else declared
        compute_dtype = (stored or torch.float32) if dtype == "source" else pick_dtype(dtype, device)
        kwargs["dtype"] = compute_dtype
        folder = Path(where) if source.kind in ("builtin", "folder") else None
        streamed = streamable and not load_in_4bit
        streamed = streamed and forward.should_stream(folder, options.max_memory, compute_dtype, device)
        if streamed:
            assert folder is not None  # should_stream needs a folder to say yes
            model: nn.Module = forward.load_streamed(folder, compute_dtype, device, trust_remote_code)
            limit = options.max_memory if options.max_memory != "auto" else "80% of the free memory"
            progress(
                f"  layer-streamed: its weights need {forward.checkpoint_bytes(folder, compute_dtype) / 2**20:,.0f} MiB "
                f"in {str(compute_dtype).replace('torch.', '')}, more than {limit}; one decoder layer is loaded "
                "at a time (generation reads every layer once per token: slow)"
            )
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "custom code" in first and not trust_remote_code:
            raise AbliterateError(
                f"{spec} ships its own model code (auto_map in config.json), which abliterate does not run by "
                "default; read that code, then pass --trust-remote-code to run it"
            ) from None
        raise AbliterateError(f"could not load model '{spec}': {first}") from None
    if "device_map" not in kwargs and forward.stream_of(model) is None:
        model.to(device)  # a streamed model's real parts are on the device already
    model.eval()
    model.requires_grad_(False)
    _clear_gguf_quantization(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the last prompt token sits at position -1 for every row
    tokenizer.truncation_side = "left"
    source_dtype = stored or compute_dtype
    return LoadedModel(model, tokenizer, source, architecture_for(model), source_dtype, options)


def check_4bit(device: str) -> None:
    """4-bit loading needs bitsandbytes and a CUDA device; say so before anything is loaded."""
    device = pick_device(device) if device == "auto" else device
    if not device.startswith("cuda"):
        raise AbliterateError(
            f"--load-in-4bit needs a CUDA GPU (bitsandbytes) but the device is '{device}'; drop --load-in-4bit"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AbliterateError("--load-in-4bit needs bitsandbytes; install it with pip install 'abliterate[quant]'")


def _check_weights_format(folder: Path, allow_pickle: bool) -> None:
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise AbliterateError(
            f"{folder} holds only pickle checkpoints (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )


def _config_dtype(config) -> torch.dtype | None:
    """The dtype a checkpoint's config declares, if any."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return DTYPES.get(str(value).replace("torch.", ""))


def _clear_gguf_quantization(model: nn.Module) -> None:
    """GGUF weights arrive dequantized; drop the marker that stops save_pretrained."""
    if getattr(model, "hf_quantizer", None) is not None and "gguf" in str(model.hf_quantizer).lower():
        # torch types Module.__setattr__ as taking only tensors and modules; any plain attribute is allowed
        model.hf_quantizer = None  # type: ignore[assignment]
        model.is_quantized = False  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def _cache_dequantized(gguf_path: Path, target: Path) -> None:
    """Load a GGUF once in float32 and save it as safetensors, renamed into place when complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    _clear_gguf_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".hf-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def encode(tokenizer, texts: list[str], device: torch.device | str) -> dict:
    """Tokenize with left padding; position ids follow the attention mask so padding changes nothing.

    Prompts longer than tokenizer.model_max_length lose their beginning (truncation_side is left),
    so the end of the chat template, where the answer starts, is always kept.
    """
    batch = tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,  # chat templates already carry their special tokens
        truncation=True,
    )
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": mask.to(device),
        "position_ids": position_ids.to(device),
    }


@torch.no_grad()
def last_token_logprobs(model: nn.Module, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
    """Log-probabilities (float32, CPU) of the next token after each prompt, shape (n, vocab)."""
    device = input_embeddings(model).weight.device
    batches = [
        encode(tokenizer, texts[start : start + batch_size], device) for start in range(0, len(texts), batch_size)
    ]
    out = [
        torch.log_softmax(o.logits[:, -1, :].float(), dim=-1).cpu()
        for o in forward.run(model, batches, logits_to_keep=1)
    ]
    return torch.cat(out)


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Greedy decoding: per prompt, in input order, (prompt ids, answer ids up to and including the first EOS)."""
    device = input_embeddings(model).weight.device
    stop = stop_ids(model, tokenizer)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    result: list[tuple[list[int], list[int]]] = [([], [])] * len(texts)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        inputs = encode(tokenizer, [texts[i] for i in index], device)
        inputs.pop("position_ids")  # generate derives them from the attention mask itself
        out = cast("GenerationMixin", model).generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        width = inputs["input_ids"].shape[1]
        for i, row, mask in zip(index, out.tolist(), inputs["attention_mask"].bool().tolist()):
            answer = row[width:]
            end = next((k + 1 for k, t in enumerate(answer) if t in stop), len(answer))
            result[i] = ([t for t, keep in zip(row[:width], mask) if keep], answer[:end])
        if on_batch:
            on_batch(len(index))
    return result


def generate(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of each prompt, decoded without special tokens, in input order."""
    pairs = generate_ids(model, tokenizer, texts, max_new_tokens, batch_size, on_batch)
    return [answer_text(tokenizer, answer) for _, answer in pairs]


def answer_text(tokenizer, answer: list[int]) -> str:
    """Generated answer ids as the text every stage judges: decoded without special tokens, stripped."""
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


def stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """The token ids that end an answer: the generation config's EOS ids, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or ())


def kl_divergence(reference: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Per row KL(reference || edited) of distributions given as log-probs."""
    return (reference.exp() * (reference - edited)).sum(-1).clamp_min(0)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model was built for, where its config says."""
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def limit_prompt_length(
    tokenizer: PreTrainedTokenizerBase, model: nn.Module, texts: list[str], reserve: int
) -> tuple[PreTrainedTokenizerBase, int]:
    """A copy of the tokenizer that cuts prompts to the context minus `reserve` new tokens; how many were too long.

    A copy, so the loaded tokenizer (which is saved with the model) keeps its real context.
    """
    context = context_length(model)
    if context is None:
        return tokenizer, 0
    limited = copy.copy(tokenizer)
    limited.model_max_length = max(8, context - reserve)
    too_long = sum(len(ids) > limited.model_max_length for ids in limited(texts, add_special_tokens=False).input_ids)
    return limited, too_long


@torch.no_grad()
def forward_is_finite(model: nn.Module, tokenizer, texts: list[str]) -> bool:
    """Whether a forward pass over a few prompts gives finite logits (half precision can overflow)."""
    device = input_embeddings(model).weight.device
    logits = model(**encode(tokenizer, texts, device), use_cache=False).logits
    return bool(torch.isfinite(logits).all())
