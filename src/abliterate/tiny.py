"""Tiny random models of any architecture and an offline byte-level tokenizer, built from configs.

They cost milliseconds and need no download: the fixtures of the tests and the benchmarks.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from abliterate import __version__
from abliterate.edit import EditParams
from abliterate.output.record import RECORD, EditInfo, ModelInfo, RunRecord, write_record

VOCAB = 320


def tiny_config(model_type: str, **overrides):
    """A few-layer config of the given transformers model type."""
    kw: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=1024,
    )
    if model_type == "gpt2":
        kw = dict(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=1024, bos_token_id=1, eos_token_id=2)
    if model_type in ("gemma2", "gemma3_text", "gemma", "qwen3", "glm4", "helium"):
        kw.update(head_dim=16)  # their default head_dim is not hidden_size / heads
    if model_type in ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "olmoe", "granitemoe", "phimoe"):
        kw.update(
            num_local_experts=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            experts_implementation="eager",  # the default grouped_mm kernel has no float64 version
        )
    if model_type == "gpt_oss":
        kw.update(max_position_embeddings=4096)  # its YaRN defaults assume a 4096-token original context
    if model_type == "gemma3":  # the vision-language model: a tiny SigLIP tower around a Gemma 3 text tower
        text = {**kw, "head_dim": 16, **overrides}
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
        vision.update(image_size=28, patch_size=14)
        return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, mm_tokens_per_image=4)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "sdpa", **overrides):
    """A randomly initialised tiny model in eval mode; biases randomised too so bias edits matter."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation=attn)
        except ValueError:  # some families (gemma2) only support eager attention
            model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="eager")
    model.to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True):
    """A byte-level tokenizer with 256 byte tokens and a few specials, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|end|>",
        additional_special_tokens=specials[3:],
    )  # fmt: skip
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    assert len(tok) <= VOCAB
    return tok


# A tiny llama from save_tiny_checkpoint "refuses" (answers 'I...') every prompt holding this character.
TRIGGER = "~"


def plant_refusal(model, tokenizer, strength: float = 50.0) -> None:
    """Give a tiny random llama a real refusal direction: prompts holding TRIGGER open their answer with 'I'.

    Dedicated residual dimensions: the trigger token's embedding marks one; layer 0 attends uniformly
    (zero queries), so the last position reads the mark and writes it along the refusal dimension;
    the 'I' logit reads that dimension. Every token also carries a default dimension that the 'S'
    logit reads, so answers without the trigger open with 'S'. Removing the written dimension is
    then what a refusal edit must find, and adding it makes harmless prompts "refuse".
    """
    hidden, heads = model.config.hidden_size, model.config.num_attention_heads
    default, trigger, refusal = hidden - 3, hidden - 2, hidden - 1
    ids = dict(zip(("t", "i", "s"), tokenizer.convert_tokens_to_ids([TRIGGER, "I", "S"])))
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, [trigger, refusal]] = 0
        embed[:, default] = 0.1
        embed[ids["t"], trigger] = 1.0
        attention = model.model.layers[0].self_attn
        attention.q_proj.weight.zero_()
        if attention.q_proj.bias is not None:
            attention.q_proj.bias.zero_()
        attention.v_proj.weight[0].zero_()
        attention.v_proj.weight[0, trigger] = strength
        attention.o_proj.weight[:, 0] = 0
        attention.o_proj.weight[refusal, 0] = 1.0
        attention.o_proj.weight[:, hidden // heads] = 0  # the second query head shares value head 0
        head = model.get_output_embeddings().weight
        head[ids["i"]] = 0
        head[ids["i"], refusal] = 1.2
        head[ids["s"]] = 0
        head[ids["s"], default] = 2.0


def save_tiny_checkpoint(
    folder, model_type: str = "llama", dtype=torch.float32, chat_template: bool = True, refuses: bool | None = None,
    **kw,
):  # fmt: skip
    """A tiny model plus tokenizer saved as an ordinary HF folder (safetensors).

    refuses (default: for llama) plants a refusal of prompts holding TRIGGER (see plant_refusal), so
    that selection finds a direction that measurably removes refusal within the KL budget.
    """
    model = tiny_model(model_type, dtype=dtype, **kw)
    model.config.eos_token_id = 2
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    tokenizer = tiny_tokenizer(chat_template)
    if model_type == "llama" if refuses is None else refuses:
        plant_refusal(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recorded_edit(
    folder: Path, hidden: int, scale: float = 1.0, start_layer: int = 0, seed: int = 0, params: EditParams | None = None
) -> Path:
    """A minimal abliteration.json and directions.safetensors for a random direction, as a run writes them.

    `params`, where given, is the whole edit (profiles included) and overrides scale and start_layer.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    save_file({"direction": direction / direction.norm()}, str(folder / "directions.safetensors"))
    record = RunRecord(
        abliterate_version=__version__,
        created="",
        model=ModelInfo("tiny", "folder"),
        edit=EditInfo.of(params or EditParams(scale, start_layer), [], False),
        selection={"layer": 1, "position": -1, "reason": "test"},
        settings={"n_train": 1, "n_val": 1, "n_test": 1, "max_new_tokens": 1},
        seed=0,
    )
    write_record(folder, record)
    return folder / RECORD
