"""GGUF export: files transformers (and, where installed, llama.cpp) load back to the saved model's logits."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate import cli
from abliterate.errors import AbliterateError
from abliterate.export.gguf import export_gguf, permute_qk, read_metadata
from abliterate.offline import sha256_file
from abliterate.output.record import ModelInfo, load_record, write_record
from abliterate.tiny import CHAT_TEMPLATE, recorded_edit, save_tiny_checkpoint

SAMPLE = "The quick brown fox: 12345 kill -9 <|user|>hello world"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def bpe_tokenizer(split_regex: str | None = None):
    """A byte-level BPE tokenizer with real merges, trained offline on a few sentences."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    core = Tokenizer(models.BPE())
    if split_regex:  # Qwen2's way: split by its regex, then byte-level without GPT-2's regex
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split_regex), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
        )
    else:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=310, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    text = ["the quick brown fox jumps over the lazy dog", "how do I kill a stuck process 123", "hello world"] * 20
    core.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|end|>",
        additional_special_tokens=specials[3:],
    )  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    return tok


def checkpoint(folder, model_type="llama", **kw):
    """A tiny saved model whose tokenizer can be embedded in a GGUF."""
    from safetensors.torch import load_file, save_file

    save_tiny_checkpoint(folder, model_type, **kw)
    # Random init leaves attention nearly uniform, which would hide a wrong q/k layout; sharpen it.
    weights = load_file(folder / "model.safetensors")
    for name in weights:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[name] *= 12
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    bpe_tokenizer(QWEN2_SPLIT if model_type.startswith("qwen") else None).save_pretrained(folder)
    return folder


def logits_pair(folder, gguf_path):
    """Logits of the saved model and of the GGUF loaded back by transformers, on the same random ids."""
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    ids = torch.randint(6, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ref(ids).logits, back(ids).logits, back


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def tensor_types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize(
    ("model_type", "kind", "pre", "overrides"),
    [
        ("llama", "f16", "gpt-2", {}),
        ("llama", "bf16", "gpt-2", {}),
        ("qwen2", "f16", "qwen2", {}),
        ("qwen3", "f16", "qwen2", {"head_dim": 128}),  # transformers reads qwen3 back with its default head_dim
    ],
)
def test_round_trip_gives_the_saved_models_logits_and_tokens(tmp_path, model_type, kind, pre, overrides):
    folder = checkpoint(tmp_path / "model", model_type, **overrides)
    out = export_gguf(folder, tmp_path / "out" / "model.gguf", kind)
    assert out.stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044  # readable by others, umask allowing

    meta = read_metadata(out)
    assert meta["general.architecture"].value == model_type
    assert meta["general.file_type"].value == {"f16": 1, "bf16": 32}[kind]
    assert meta["tokenizer.ggml.pre"].value == pre
    assert meta["tokenizer.chat_template"].value == CHAT_TEMPLATE
    assert meta["tokenizer.ggml.eos_token_id"].value == 2
    assert len(meta["tokenizer.ggml.tokens"].value) == 320  # padded to the embedding rows
    types = tensor_types(out)
    assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"

    a, b, _ = logits_pair(folder, out)
    assert cosine(a, b) > 0.999
    same = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert same == 1 if kind == "f16" else same >= 0.9  # bf16 keeps 8 mantissa bits: near-ties may flip

    original = AutoTokenizer.from_pretrained(folder)
    back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert back(SAMPLE).input_ids == original(SAMPLE).input_ids
    assert len(original(SAMPLE).input_ids) < len(SAMPLE.encode())  # merges were used, not just bytes
    assert back.chat_template == CHAT_TEMPLATE


def test_q8_0_is_quantized_and_close(tmp_path):
    folder = checkpoint(tmp_path / "model")
    out = export_gguf(folder, tmp_path / "model.gguf", "q8_0")
    types = tensor_types(out)
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["output_norm.weight"] == "F32"
    assert read_metadata(out)["general.file_type"].value == 7
    a, b, _ = logits_pair(folder, out)
    assert cosine(a, b) > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert out.stat().st_size < export_gguf(folder, tmp_path / "f16.gguf", "f16").stat().st_size


@pytest.mark.parametrize("tied", [False, True])
def test_output_weight_only_for_an_untied_head(tmp_path, tied):
    folder = checkpoint(tmp_path / "model", tie_word_embeddings=tied)
    out = export_gguf(folder, tmp_path / "model.gguf")
    assert ("output.weight" in tensor_types(out)) is not tied
    _, _, back = logits_pair(folder, out)
    assert back.config.tie_word_embeddings is tied


def test_qk_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    q = torch.randn(8 * 6, 10)  # 8 query heads of dim 6
    k = torch.randn(2 * 6, 10)  # 2 key-value heads
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    assert not torch.equal(permute_qk(q, 8), q)
    assert torch.equal(torch.from_numpy(undo(permute_qk(q, 8).numpy(), 8, 8)), q)
    assert torch.equal(torch.from_numpy(undo(permute_qk(k, 2).numpy(), 8, 2)), k)


def test_metadata_reader_agrees_with_gguf_package(tmp_path):
    out = export_gguf(checkpoint(tmp_path / "model"), tmp_path / "model.gguf")
    ours = read_metadata(out)
    theirs = {k: f for k, f in gguf.GGUFReader(out).fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, field in theirs.items():
        assert ours[key].type == field.types[0], key
        assert ours[key].value == pytest.approx(field.contents()), key


def source_gguf(path, exported, **overrides):
    """A GGUF with `exported`'s metadata plus `overrides`, standing in for the file a run started from."""
    writer = gguf.GGUFWriter(path, "llama")
    keys = {k: v for k, v in read_metadata(exported).items() if k != "general.architecture"}
    S, U32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
    for key, value in overrides.items():
        keys[key.replace("__", ".")] = type(keys[next(iter(keys))])(value, S if isinstance(value, str) else U32)
    for key, v in keys.items():
        writer.add_key_value(key, v.value, v.type, v.sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def test_source_gguf_metadata_is_kept_except_what_the_new_file_changes(tmp_path):
    folder = checkpoint(tmp_path / "model")
    plain = export_gguf(folder, tmp_path / "plain.gguf")
    src = source_gguf(
        tmp_path / "src.gguf", plain, general__name="Source Model", general__license="mit", general__file_type=15,
        llama__context_length=7, tokenizer__ggml__pre="smollm",
    )  # fmt: skip
    out = export_gguf(folder, tmp_path / "out.gguf", "q8_0", source_gguf=src)
    meta = read_metadata(out)
    assert meta["general.name"].value == "Source Model" and meta["general.license"].value == "mit"
    assert meta["tokenizer.ggml.pre"].value == "smollm"  # the source's vocabulary, as llama.cpp had it
    assert meta["general.file_type"].value == 7  # this file's type, not the source's 15
    assert meta["llama.context_length"].value == 1024  # this model's config, not the source's

    # the run's record names the source and its hash: found without --source-gguf
    record = load_record(recorded_edit(tmp_path / "edit", hidden=64))  # as a run writes it, for this source
    write_record(folder, replace(record, model=ModelInfo(str(src), "gguf", sha256=sha256_file(src))))
    assert read_metadata(export_gguf(folder, tmp_path / "rec.gguf"))["general.license"].value == "mit"

    write_record(folder, replace(record, model=ModelInfo(str(src), "gguf", sha256="0" * 64)))
    with pytest.raises(AbliterateError, match="not the GGUF this model was made from"):
        export_gguf(folder, tmp_path / "bad.gguf", source_gguf=src)
    assert not (tmp_path / "bad.gguf").exists()


def test_source_gguf_of_another_architecture_is_refused(tmp_path):
    folder = checkpoint(tmp_path / "model")
    qwen = export_gguf(checkpoint(tmp_path / "qwen", "qwen2"), tmp_path / "qwen.gguf")
    with pytest.raises(AbliterateError, match="qwen2 GGUF but the model is llama"):
        export_gguf(folder, tmp_path / "out.gguf", source_gguf=qwen)


def test_failures_leave_no_file(tmp_path, monkeypatch):
    from abliterate.export import gguf

    folder = checkpoint(tmp_path / "model")
    out = tmp_path / "out" / "model.gguf"

    def broken(*args):
        raise AbliterateError("disk on fire")

    monkeypatch.setattr(gguf, "_encode", broken)
    with pytest.raises(AbliterateError, match="disk on fire"):
        export_gguf(folder, out)
    assert list(out.parent.iterdir()) == []


def test_float16_overflow_asks_for_bf16(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = checkpoint(tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AbliterateError, match="--type bf16"):
        export_gguf(folder, tmp_path / "model.gguf", "f16")
    export_gguf(folder, tmp_path / "model.gguf", "bf16")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--type", "q4_k_m"], "the gguf package cannot write K-quants; export f16, bf16 or q8_0 and run llama.cpp's llama-quantize"),
        (["--type", "q5"], "unknown --type q5; use one of f16, bf16, q8_0"),
    ],
)  # fmt: skip
def test_cli_refuses_types_it_cannot_write(tmp_path, capsys, args, message):
    code = cli.main(["export-gguf", str(tmp_path), "--out", str(tmp_path / "m.gguf"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["export-gguf", str(tmp_path / "missing"), "--out", str(tmp_path / "m.gguf")]) == 2
    assert "no config.json" in capsys.readouterr().err

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert cli.main(["export-gguf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "m.gguf")]) == 2
    assert "supports model types llama, qwen2, qwen3; " in capsys.readouterr().err

    folder = checkpoint(tmp_path / "model")
    assert cli.main(["export-gguf", str(folder), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert cli.main(["export-gguf", str(folder), "--out", str(tmp_path / "m.gguf")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert cli.main(["export-gguf", str(folder), "--out", str(tmp_path / "m.gguf"), "--force"]) == 0
    assert read_metadata(tmp_path / "m.gguf")["general.file_type"].value == 1


def test_unrecognised_pre_tokenizer_warns(tmp_path, caplog):
    from tokenizers import pre_tokenizers

    folder = checkpoint(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        out = export_gguf(folder, tmp_path / "model.gguf")
    assert read_metadata(out)["tokenizer.ggml.pre"].value == "default"
    assert "unrecognised pre-tokenizer" in caplog.text


def test_llama_cpp_generates_from_the_export(tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed: PyPI has only its source package, which compiles llama.cpp "
        "(many minutes); `pip install llama-cpp-python` to run this test",
    )
    folder = checkpoint(tmp_path / "model")
    out = export_gguf(folder, tmp_path / "model.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False)
    ids = AutoTokenizer.from_pretrained(folder)(SAMPLE).input_ids
    assert llm.tokenize(SAMPLE.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    assert cosine(expected, got) > 0.99
    text = llm.create_completion(SAMPLE, max_tokens=4, temperature=0.0)["choices"][0]["text"]
    assert isinstance(text, str)
