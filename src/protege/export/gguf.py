"""Export a Llama, Mistral or Qwen2 causal-LM student to GGUF, checked by running it back in llama.cpp.

The folder holds ``model.gguf`` (weights, hyper-parameters, tokenizer and chat template in one file, what
llama.cpp's server and ``llama-cli`` load), ``protege.json`` and ``recipe.yaml`` when the student has them, and
the export's report.

* Conversion: the conventions of llama.cpp's own ``convert_hf_to_gguf.py`` (``LlamaModel``, ``Qwen2Model``),
  written with the ``gguf`` package's ``GGUFWriter`` and tensor-name map of the llama.cpp architecture
  (:data:`ARCHITECTURES`). For ``llama`` (Llama, Mistral) llama.cpp applies rotary embeddings to adjacent pairs
  of a head's dimensions, Hugging Face to its two halves, so q_proj and k_proj rows are permuted
  (:func:`permute_qk`); ``qwen2`` rotates halves, as Hugging Face does, and keeps the q/k/v biases. Tied embeddings are written once (``token_embd``), which llama.cpp reuses as
  the output layer. ``f16`` (default) stores matrices in float16 and norms in float32, as the convert script
  does; ``f32`` stores everything in float32.
* Tokenizer: byte-level BPE only (``tokenizer.ggml.model`` "gpt2"): the tokens with llama.cpp's token types,
  the merges, special-token ids, whether a BOS/EOS is added, and the chat template. llama.cpp picks its
  pre-tokenizer (the regex that splits text before BPE) by name; the name is found as the convert script does,
  by hashing the tokens of a test string (SmolLM2: "smollm"), else from the tokenizer's own pre-tokenizer
  (plain ByteLevel: "gpt-2").
* Checks, in llama.cpp (llama-cpp-python, the engine of its server) on the file just written:
  tokenization: llama.cpp's tokens equal the Hugging Face tokenizer's for the sample texts, their chat prompts
  and a hard test string (emoji, CJK, digits, whitespace runs);
  logits: each sample's chat prompt plus a greedy continuation of ``new_tokens`` tokens by llama.cpp, through
  both runtimes; it fails past ``atol`` (largest |Δlogit| over every position) or where an argmax differs but
  for a near-tie (export.parity), so llama.cpp's greedy tokens are PyTorch's. Default atol by type:
  DEFAULT_ATOL (llama.cpp computes in its own kernels; f16 also rounds weights and, in its matrix products,
  activations to float16); q/k rows left unpermuted are off by 6 to 19. The check's KV cache is float32, so
  that it measures the file, not the cache type a server picks (llama.cpp's default float16 cache alone moves
  the SmolLM2 student's f32 logits by 0.07).
* Latency: each sample prompt at a time through PyTorch and llama.cpp (whole-sequence logits, no cache),
  alternating run by run on the same threads, p50/p95 ms, as the ONNX export reports.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from hashlib import sha256
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_dir
from ..errors import MissingExtra, ProtegeError
from ..students import StudentCard, student_kind
from ..students.chat import ChatFormat
from .common import SAMPLE_TEXTS, ExportReport, RuntimeLatency, _load, compare_latency, parity, write_report

__all__ = ["ARCHITECTURES", "DEFAULT_ATOL", "GGUF_TYPES", "SUPPORTED", "export_gguf", "permute_qk", "pre_tokenizer", "write_gguf"]

# Hugging Face architecture -> (llama.cpp architecture, q/k rows permuted). As llama.cpp's convert_hf_to_gguf.py:
# Llama and Mistral (its LlamaModel) rotate adjacent pairs, so their q/k rows are reordered; Qwen2 (its
# Qwen2Model, llama.cpp's NEOX rotary) rotates halves as Hugging Face does, and has q/k/v biases.
ARCHITECTURES = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
}
SUPPORTED = ", ".join(ARCHITECTURES)
GGUF_TYPES = ("f16", "f32")
# Measured (max |Δlogit| over 214 positions): SmolLM2-135M-Instruct 1.1e-4 (f32) / 0.092 (f16), its 11-layer
# teacher_layers student 1.9e-4 / 0.15; a conversion error (q/k left unpermuted) is off by 6 to 19.
DEFAULT_ATOL = {"f32": 1e-3, "f16": 0.5}
MODEL_FILE = "model.gguf"
COPIED = ("protege.json", "recipe.yaml")
NEW_TOKENS = 8

# The test string of llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre): the sha256 of its token ids names
# the pre-tokenizer. Listed: the Llama-architecture families a student is likely cut from, and GPT-2's.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


# --------------------------------------------------------------------------------------------------------------
# conversion


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q_proj/k_proj weight (or bias) reordered from Hugging Face's rotary layout to llama.cpp's.

    Within each of the ``n_head`` heads (for k_proj: the KV heads) of dimension d, HF rotates dimension i with
    i + d/2, llama.cpp rotates 2i with 2i + 1: row h·d + j·d/2 + i moves to h·d + 2i + j. The same reordering
    as ``LlamaModel.permute`` in llama.cpp's convert_hf_to_gguf.py."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(cfg: Any) -> dict[str, Any]:
    """The rotary settings: ``rope_parameters`` since transformers 5, ``rope_theta``/``rope_scaling`` before."""
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return rope


def _arch(model: Any) -> tuple[Any, bool]:
    """(gguf.MODEL_ARCH member, whether q/k rows are permuted) for ``model``'s architecture."""
    import gguf

    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ProtegeError(f"GGUF export supports {SUPPORTED} students, not {name}; use --format onnx")
    arch, permute = ARCHITECTURES[name]
    return gguf.MODEL_ARCH[arch], permute


def _check_config(cfg: Any) -> None:
    problems = []
    if (rope_type := _rope(cfg).get("rope_type", "default")) != "default":
        problems.append(f"rope scaling {rope_type!r} (only plain rotary embeddings are converted)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.hidden_act!r} (llama.cpp's llama uses silu)")
    if problems:
        raise ProtegeError(f"cannot convert this model to GGUF: {'; '.join(problems)}. Export it with "
                           "--format onnx instead")


def _tensors(model: Any, gguf_type: str) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) for every weight, q/k permuted, in the type the file stores."""
    import gguf

    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    arch, permute = _arch(model)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    out = []
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the output layer when output.weight is absent
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ProtegeError(f"cannot convert {type(model).__name__} weight {name!r}: llama.cpp's "
                               f"{gguf.MODEL_ARCH_NAMES[arch]} has no such tensor")
        t = t.detach().float()
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, n_head)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, n_kv)
        # llama.cpp keeps 1-D tensors (norms, biases) in float32 whatever the file type
        dtype = np.float16 if gguf_type == "f16" and t.ndim >= 2 else np.float32
        out.append((new, t.numpy().astype(dtype)))
    return out


def _backend(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's tokenizer.json content."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ProtegeError("GGUF export needs the student's fast tokenizer (tokenizer.json)")
    return json.loads(tokenizer.backend_tokenizer.to_str())


# Qwen2's pre-tokenizer split (its tokenizer.json), which llama.cpp names "qwen2"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer(tokenizer: Any) -> tuple[str, str]:
    """(llama.cpp pre-tokenizer name, how it was found: "hash" | "structure"), or ProtegeError."""
    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if digest in PRE_BY_HASH:
        return PRE_BY_HASH[digest], "hash"
    spec = _backend(tokenizer).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" and parts[-1].get("use_regex", True) else None
    if byte_level and kinds == ["ByteLevel"]:
        return "gpt-2", "structure"
    if byte_level and kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm", "structure"  # its regex: each digit alone, then GPT-2's
    if kinds == ["Split", "ByteLevel"] and (parts[0].get("pattern") or {}).get("Regex") == QWEN2_REGEX:
        return "qwen2", "structure"  # Qwen2's own split, then bytes without GPT-2's regex
    raise ProtegeError(
        f"GGUF export supports byte-level BPE tokenizers (GPT-2 style); this one's pre-tokenizer is {kinds or None}, "
        "which llama.cpp has no name for here. Export with --format onnx instead"
    )


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (ids the tokenizer lacks are padding)."""
    import gguf

    model = _backend(tokenizer)["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ProtegeError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 style); this one is {model.get('type')}"
            + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else "")
            + ". Export with --format onnx instead"
        )
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise ProtegeError(f"the tokenizer has ids up to {max(reverse)}, past the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    return tokens, types


def _adds(tokenizer: Any) -> dict[str, bool]:
    """Whether the tokenizer puts a BOS before / an EOS after a text, measured rather than read from config."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    added = len(full) > len(plain)
    return {"bos": added and bos is not None and full[0] == bos, "eos": added and eos is not None and full[-1] == eos}


def write_gguf(model: Any, tokenizer: Any, tokenizer_dir: Path, path: Path, gguf_type: str = "f16",
               name: str = "student") -> dict[str, Any]:
    """Write ``model`` (one of :data:`ARCHITECTURES`) and its tokenizer, saved in ``tokenizer_dir``, to the GGUF file ``path``.

    Returns what was written about the tokenizer: {pre, pre_source, tokens, merges, add_bos, add_eos,
    chat_template}."""
    import gguf

    cfg = model.config
    _check_config(cfg)
    tokens, types = _vocab(tokenizer, cfg.vocab_size)  # refuses what is not byte-level BPE
    pre, pre_source = pre_tokenizer(tokenizer)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ProtegeError(f"no BPE merges found in {str(tokenizer_dir)!r}; save the tokenizer with save_pretrained")
    special.add_special_token.update(_adds(tokenizer))
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    ftype = gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.ALL_F32

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[_arch(model)[0]])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    w.add_rope_freq_base(float(_rope(cfg)["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:  # llama.cpp derives it from the embedding length otherwise
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)  # merges, special-token ids, add_bos/add_eos, chat template
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, data in _tensors(model, gguf_type):
        w.add_tensor(tensor_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"arch": gguf.MODEL_ARCH_NAMES[_arch(model)[0]], "model": "gpt2", "pre": pre, "pre_source": pre_source, "tokens": len(tokens),
            "merges": len(special.merges), "add_bos": special.add_special_token["bos"],
            "add_eos": special.add_special_token["eos"], "chat_template": special.chat_template is not None}


# --------------------------------------------------------------------------------------------------------------
# the check in llama.cpp


def _llama(path: Path, n_ctx: int, threads: int) -> Any:
    from llama_cpp import GGML_TYPE_F32, Llama

    # a float32 KV cache, not llama.cpp's default float16: the check measures the file (module docstring)
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                 n_threads=threads, n_threads_batch=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)


def _prompt(chat: ChatFormat, tokenizer: Any, text: str) -> str:
    """The text as a user's chat message ready for the reply, in the student's chat format (its card's: chat
    template or plain text, answer prefix), as `protege serve` renders it."""
    return chat.prompt_text(tokenizer, [{"role": "user", "content": text}])


def _tokenization(llm: Any, tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """llama.cpp's tokens against Hugging Face's (special tokens parsed, a BOS where the tokenizer adds one)."""
    for text in texts:
        hf = tokenizer(text)["input_ids"]
        lc = llm.tokenize(text.encode(), add_bos=True, special=True)
        if hf != lc:
            raise ProtegeError(
                f"llama.cpp tokenizes {text[:60]!r} as {lc[:20]}..., the student's tokenizer as {hf[:20]}...; the "
                "GGUF's tokenizer does not match, nothing was written. Report it with the tokenizer's name"
            )
    return {"texts": len(texts), "identical": True}


def _greedy(llm: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """(prompt + llama.cpp's greedy continuation, llama.cpp's logits at every position (T, V))."""
    llm.reset()
    llm.eval(prompt)
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(np.argmax(llm.scores[len(ids) - 1])))
        llm.eval(ids[-1:])
    return ids, np.array(llm.scores[: len(ids)], dtype=np.float32)


def _latency(model: Any, llm: Any, prompts: list[list[int]], runs: int, warmup: int) -> RuntimeLatency:
    """One prompt per call (logits at every position, no cache), PyTorch and llama.cpp alternating."""
    tensors = [torch.tensor([ids]) for ids in prompts]

    def run_llama(i: int) -> None:
        llm.reset()
        llm.eval(prompts[i % len(prompts)])

    return compare_latency("llama.cpp", lambda i: model(input_ids=tensors[i % len(tensors)], use_cache=False),
                           run_llama, runs, warmup)


def _check(model: Any, tokenizer: Any, llm: Any, texts: list[str], prompts: list[list[int]], atol: float,
           new_tokens: int) -> dict[str, Any]:
    """Both runtimes' logits at every position of each prompt plus llama.cpp's greedy continuation of it."""
    refs, gots, samples, identical = [], [], [], True
    for text, prompt in zip(texts, prompts):
        ids, got = _greedy(llm, prompt, new_tokens)
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()  # (T, V)
        cont = ids[len(prompt):]
        matches = ref[len(prompt) - 1 : -1].argmax(-1).tolist() == cont  # PyTorch's pick after each prefix
        identical &= matches
        refs.append(ref)
        gots.append(got)
        samples.append({"text": text, "llama_cpp": tokenizer.decode(cont), "pytorch_matches": matches})
    ref, got = np.concatenate(refs), np.concatenate(gots)  # (N, V): every position of every sequence
    check = parity(ref, got, np.ones(len(ref), dtype=bool), "lm", atol)
    # where the argmaxes differ, how far below PyTorch's top logit llama.cpp's pick was (parity allows 2·atol)
    picked = ref[np.arange(len(ref)), got.argmax(-1)]  # (N,)
    flip_gap = float((ref.max(-1) - picked).max())
    return {"texts": len(texts), "new_tokens": new_tokens, **check, "argmax_flip_gap": flip_gap,
            "greedy_identical": bool(identical), "samples": samples}


# --------------------------------------------------------------------------------------------------------------
# the export


def _cell(text: str) -> str:
    """A string as a Markdown table cell: quoted, escapes for newlines, no bare pipes."""
    return json.dumps(text, ensure_ascii=False).replace("|", "\\|")


def _report_md(r: dict[str, Any]) -> str:
    p, lat, tk = r["parity"], r["latency"], r["tokenizer"]
    pt, lc = lat["pytorch_ms"], lat["llama_cpp_ms"]
    versions = r["versions"]
    flips = (f" (where they differ, PyTorch's top logit is at most {p['argmax_flip_gap']:.3g} above llama.cpp's "
             "pick)") if p["argmax_agreement"] < 1 else ""
    greedy = "identical" if p["greedy_identical"] else "differ only at near-ties"
    return "\n".join([
        f"# Export of `{r['student']}` ({r['kind']}, {r['architecture']})",
        "",
        (f"Format GGUF ({r['gguf_type']}, llama.cpp architecture `{r['tokenizer'].get('arch', 'llama')}`), written with gguf {versions['gguf']} and "
         f"checked with llama-cpp-python {versions['llama_cpp']}; torch {versions['torch']}; {r['created']}."),
        "",
        (f"Tokenizer: `{tk['model']}` BPE, pre-tokenizer `{tk['pre']}` (found by {tk['pre_source']}), {tk['tokens']} "
         f"tokens, {tk['merges']} merges, chat template {'included' if tk['chat_template'] else 'none'}; llama.cpp's "
         f"tokens equal the student tokenizer's on {r['tokenization']['texts']} texts."),
        "",
        "## Parity with PyTorch",
        "",
        (f"{p['texts']} sample prompts, each with a greedy continuation of {p['new_tokens']} tokens by llama.cpp; "
         f"{p['positions']} compared positions: max |Δlogit| {p['max_abs_diff']:.3g} (tolerance {p['atol']:g}), "
         f"argmax agreement {100 * p['argmax_agreement']:.1f}%{flips}, greedy continuations {greedy}: "
         + ("**passed**." if p["passed"] else "**failed**.")),
        "",
        "| prompt | llama.cpp's greedy continuation | PyTorch's the same |",
        "| --- | --- | --- |",
        *[f"| {_cell(s['text'][:40])} | {_cell(s['llama_cpp'])} | {'yes' if s['pytorch_matches'] else 'no'} |"
          for s in p["samples"]],
        "",
        (f"## CPU latency, one prompt per call ({lat['runs']} runs after {lat['warmup']} warm-up, {r['threads']} "
         "thread(s))"),
        "",
        "| runtime | p50 ms | p95 ms | mean ms |",
        "| --- | ---: | ---: | ---: |",
        f"| PyTorch | {pt['p50']:.3f} | {pt['p95']:.3f} | {pt['mean']:.3f} |",
        f"| llama.cpp | {lc['p50']:.3f} | {lc['p95']:.3f} | {lc['mean']:.3f} |",
        "",
        (f"llama.cpp is {lat['speedup_p50']:.2f}x PyTorch's speed at p50 (logits at every position of the prompt, "
         "tokenizing excluded)."),
        "",
    ])


def export_gguf(
    student_dir: Path | str,
    output: Path | str | None = None,
    *,
    gguf_type: str = "f16",
    atol: float | None = None,
    runs: int = 50,
    warmup: int = 5,
    threads: int = 1,
    texts: list[str] | None = None,
    new_tokens: int = NEW_TOKENS,
) -> ExportReport:
    """Convert the LM student in ``student_dir`` to ``output`` (default ``student_dir/gguf``), check it in
    llama.cpp and return the report.

    The folder appears whole or not at all: an unsupported student, a tokenization difference or logits outside
    ``atol`` (default DEFAULT_ATOL[gguf_type]) raise ProtegeError and leave any previous export in place."""
    student_dir = Path(student_dir)
    kind, arch = student_kind(student_dir, "protege export")
    if kind != "lm":
        raise ProtegeError(f"GGUF export is for causal-LM students; {arch} is a classifier: use --format onnx")
    if arch not in ARCHITECTURES:
        raise ProtegeError(
            f"GGUF export supports {SUPPORTED} students (llama.cpp's llama and qwen2 architectures), not {arch}; "
            "export this one with --format onnx"
        )
    if gguf_type not in GGUF_TYPES:
        raise ProtegeError(f"unknown GGUF type {gguf_type!r}; choose one of: {', '.join(GGUF_TYPES)}")
    atol = DEFAULT_ATOL[gguf_type] if atol is None else atol
    if atol < 0 or runs < 1 or warmup < 0 or threads < 1 or new_tokens < 1:
        raise ProtegeError("atol must be >= 0, runs >= 1, warmup >= 0, threads >= 1 and new_tokens >= 1")
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as e:
        raise MissingExtra(e.name or "gguf", "export-gguf", "`protege export --format gguf`") from None

    out = Path(output) if output is not None else student_dir / "gguf"
    texts = list(texts or SAMPLE_TEXTS)
    chat = StudentCard.read(student_dir).chat
    assert chat is not None  # an LM student's card always has its chat format
    model, tokenizer = _load(student_dir, "lm")
    limit = model.config.max_position_embeddings - new_tokens
    # tokenized as llama.cpp tokenizes a prompt (special tokens parsed, a BOS where the tokenizer adds one)
    prompts = [tokenizer(_prompt(chat, tokenizer, t))["input_ids"][:limit] for t in texts]
    if min(map(len, prompts)) < 1:
        raise ProtegeError("a sample text tokenizes to nothing; pass other texts")

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with atomic_dir(out) as tmp:
            tok_info = write_gguf(model, tokenizer, student_dir, tmp / MODEL_FILE, gguf_type, name=student_dir.name)
            with contextlib.closing(_llama(tmp / MODEL_FILE, max(map(len, prompts)) + new_tokens, threads)) as llm:
                tokenization = _tokenization(llm, tokenizer, texts + [_prompt(chat, tokenizer, t) for t in texts] + [CHKTXT])
                check = _check(model, tokenizer, llm, texts, prompts, atol, new_tokens)
                if not check["passed"]:
                    raise ProtegeError(
                        f"the GGUF model in llama.cpp disagrees with PyTorch: max |logit difference| "
                        f"{check['max_abs_diff']:.3g} (tolerance {atol:g}), argmax agreement "
                        f"{100 * check['argmax_agreement']:.1f}%; nothing was written. Report it with the model's "
                        "config, or loosen --atol if the difference is noise"
                    )
                latency = _latency(model, llm, prompts, runs, warmup)
            for name in COPIED:
                if (student_dir / name).is_file():
                    shutil.copy2(student_dir / name, tmp / name)
            report = write_report(tmp, ExportReport(
                student=str(student_dir), output=str(out), format="gguf", kind=kind, architecture=arch,
                details={"gguf_type": gguf_type, "converter": "protege.export.gguf (gguf.GGUFWriter)",
                         "tokenizer": tok_info, "tokenization": tokenization},
                model_bytes=(tmp / MODEL_FILE).stat().st_size,
                parameters=sum(p.numel() for p in model.parameters()),
                threads=threads, parity=check, latency=latency,
                versions={"torch": torch.__version__, "gguf": version("gguf"), "llama_cpp": llama_cpp.__version__},
            ), _report_md)
    finally:
        torch.set_num_threads(prev_threads)
    return report
