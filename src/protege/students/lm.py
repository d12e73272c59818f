"""Causal language-model students: a pretrained LM, or the teacher with some of its layers, optionally with LoRA.

A ``teacher_layers`` student is a copy of the teacher that keeps a subset of its decoder layers with their
weights (as DistilBERT did): every ``layer_stride``-th layer from the first, plus the last, unless
``keep_layers`` names them. The kept attention modules are renumbered so the KV cache (indexed by layer)
works for generation. LoRA adapters are merged into the weights before saving, so a saved student loads
with transformers alone.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingExtra, ProtegeError
from ..recipe import Recipe, StudentConfig
from ..sources import resolve_source
from .card import StudentCard

__all__ = [
    "build_lm_student",
    "load_causal_lm",
    "keep_teacher_layers",
    "default_keep_layers",
    "add_lora",
    "merge_lora",
    "lm_head",
    "save_lm_student",
    "load_lm_student",
]


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a hub id, local directory, .gguf file or packaged name; a pad token is set.

    GGUF weights are dequantized on load; the quantizer record is dropped so the model trains and saves as a
    plain model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec)
    kw: dict[str, Any] = dict(trust_remote_code=trust_remote_code, **source.kwargs())
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **kw)
        model = AutoModelForCausalLM.from_pretrained(source.name_or_path, dtype=dtype, **kw)
    except ImportError as e:
        if source.gguf_file:
            raise MissingExtra("gguf", "gguf", "loading a GGUF model") from e
        raise
    except (OSError, ValueError) as e:
        raise ProtegeError(f"cannot load the causal language model {spec!r}: {e}") from None
    if getattr(model, "hf_quantizer", None) is not None and source.gguf_file:
        # GGUF tensors are dequantized on load; what is left is only the record, which blocks saving and .float()
        model.hf_quantizer.remove_quantization_config(model)
        model.config._is_quantized = False
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def default_keep_layers(num_layers: int, stride: int) -> list[int]:
    """Every ``stride``-th layer from the first, plus the last: 30 layers, stride 3 -> 0, 3, ..., 27, 29."""
    keep = list(range(0, num_layers, stride))
    if keep[-1] != num_layers - 1:
        keep.append(num_layers - 1)
    return keep


def _decoder_layers(model: Any) -> tuple[Any, str, torch.nn.ModuleList]:
    """(the module holding the layer list, its attribute name, the list)."""
    decoder = model.get_decoder()
    n = model.config.num_hidden_layers
    for name, child in decoder.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n:
            return decoder, name, child
    raise ProtegeError(
        f"cannot find the {n} decoder layers of {type(model).__name__}; student.init teacher_layers supports "
        "decoder-only models whose layers form one list (Llama, Qwen, Mistral, Gemma, Phi, GPT-2 ...)"
    )


def keep_teacher_layers(model: Any, keep: list[int]) -> Any:
    """Cut ``model`` (in place) down to the decoder layers ``keep``, in that order, and return it.

    The config's layer count and per-layer types follow, and each kept module's ``layer_idx`` is renumbered,
    so a KV cache built from the config has one slot per kept layer.
    """
    decoder, name, layers = _decoder_layers(model)
    n = len(layers)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise ProtegeError(
            f"student.keep_layers {keep} must be distinct increasing layer indices in [0, {n - 1}] "
            f"(the teacher has {n} layers)"
        )
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(decoder, name, kept)
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return model


def add_lora(model: Any, cfg: StudentConfig) -> Any:
    """Wrap ``model`` in LoRA adapters (peft); only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise MissingExtra("peft", "lora", "student.lora_r (LoRA)") from e
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        # peft's 'all-linear' leaves out the output layer: the LM head stays as it is
        target_modules=cfg.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merge_lora(model: Any) -> Any:
    """The plain transformers model, with any LoRA adapters merged into its weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def build_lm_student(recipe: Recipe, teacher: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a new causal LM student, in float32.

    ``teacher``: the already loaded (model, tokenizer) of the 'hf:' teacher, copied rather than loaded again
    for a teacher_layers student.
    """
    cfg = recipe.student
    torch.manual_seed(recipe.training.seed)  # LoRA's initialisation is the same every run
    if cfg.init == "scratch":
        raise ProtegeError(
            "student.init: scratch is not available for causal LM students; use student.init: teacher_layers "
            "(a layer subset of an 'hf:' teacher) or a small pretrained model in student.model"
        )
    if cfg.init == "teacher_layers":
        if teacher is None:
            teacher = load_causal_lm(
                recipe.teacher.model.removeprefix("hf:"), trust_remote_code=recipe.teacher.trust_remote_code
            )
        model, tokenizer = copy.deepcopy(teacher[0]).float(), teacher[1]
        n = model.config.num_hidden_layers
        keep = cfg.keep_layers if cfg.keep_layers is not None else default_keep_layers(n, cfg.layer_stride)
        keep_teacher_layers(model, keep)
    else:
        model, tokenizer = load_causal_lm(cfg.model)
    if cfg.lora_r is not None:
        model = add_lora(model, cfg)
    return model, tokenizer


def lm_head(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, H), bias (V,) or None) such that logits = hidden @ weight.T + bias, for chunked losses.

    A constant logit scale (Cohere's ``logit_scale``, Granite's ``logits_scaling``) is folded into them;
    final-logit softcapping (Gemma 2) is not linear and is refused.
    """
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None):
        raise ProtegeError(
            f"{type(model).__name__} caps its final logits (final_logit_softcapping), which the chunked LM-head "
            "loss does not model; pick a student without it"
        )
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ProtegeError(f"the LM head of {type(model).__name__} is not a linear layer; the chunked loss needs one")
    weight, bias = head.weight, head.bias
    scale = getattr(cfg, "logit_scale", None) or 1.0
    if getattr(cfg, "logits_scaling", None):
        scale /= cfg.logits_scaling
    if scale != 1.0:
        weight = weight * scale
        bias = None if bias is None else bias * scale
    return weight, bias


def save_lm_student(model: Any, tokenizer: Any, path: Path, card: StudentCard) -> None:
    """save_pretrained (safetensors, LoRA merged) plus the tokenizer and the card, protege.json."""
    if card.kind != "causal_lm":
        raise ValueError(f"a language-model student is saved with a causal_lm card, not a {card.kind}'s")
    model = merge_lora(model)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    card.write(path)


def load_lm_student(path: Path) -> tuple[Any, Any, StudentCard]:
    """(model in eval mode, tokenizer, card) of a saved causal LM student."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    card = StudentCard.read(path)
    if card.kind != "causal_lm":
        raise ProtegeError(f"{str(path)!r} is a {card.kind} student, not a language model")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if card.chat is not None and card.chat.template and not tokenizer.chat_template:
        raise ProtegeError(f"{str(path)!r}: the student was trained with its tokenizer's chat template and the saved "
                           "tokenizer has none; the student directory is damaged, retrain it with `protege train`")
    return model.eval(), tokenizer, card
