"""`protege export --format gguf`: a tiny Llama student with a byte-level BPE tokenizer converted to GGUF, read
back with the gguf package, run in llama.cpp (in process and behind its server) and compared with PyTorch; other
architectures and tokenizers refused, and a wrong conversion caught by the check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from protege.cli import cli
from protege.errors import ProtegeError

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from lm_fixtures import SPECIAL, make_llama, make_tokenizer, save_model, save_student
from servers import LlamaServer

from protege.export import ExportReport, export_student
from protege.export import gguf as eg

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _student(path: Path, tie: bool) -> Path:
    """A 2-layer Llama over a byte-level BPE tokenizer, saved as `protege train` saves an LM student. Its matrices
    are scaled up from the 0.02 init: at that scale attention barely moves the logits, and a q/k permutation
    error would change them by only ~2e-3; scaled, by ~6."""
    tok = make_tokenizer()
    model = make_llama(tok, tie=tie)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return save_student(path, model, tok)


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return _student(tmp_path_factory.mktemp("gguf") / "student", tie=True)


@pytest.fixture(scope="module")
def cli_export(tied) -> tuple[Path, str]:
    """`protege export STUDENT --format gguf` (f16, the default) into the default folder STUDENT/gguf."""
    result = CliRunner().invoke(cli, ["export", str(tied), "--format", "gguf", "--runs", "5"])
    assert result.exit_code == 0, result.output
    return tied / "gguf", result.output


@pytest.fixture(scope="module")
def f32_export(tmp_path_factory) -> tuple[Path, ExportReport]:
    """An untied student exported in f32 through the library."""
    student = _student(tmp_path_factory.mktemp("gguf-f32") / "student", tie=False)
    return student, export_student(student, "gguf", student / "out", gguf_type="f32", runs=3)


def _reader(folder: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(folder / "model.gguf")
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def _llama(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


# --------------------------------------------------------------------------------------------------------------
# the conversion


def _rope_half(x: torch.Tensor, pos: int) -> torch.Tensor:
    """Hugging Face's rotary embedding of one head (d,): dimension i turns with i + d/2."""
    d = x.shape[-1]
    theta = pos * 10000.0 ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    a, b = x[: d // 2], x[d // 2 :]
    return torch.cat([a * theta.cos() - b * theta.sin(), b * theta.cos() + a * theta.sin()])


def _rope_pairs(x: torch.Tensor, pos: int) -> torch.Tensor:
    """llama.cpp's (GGML_ROPE_TYPE_NORM) rotary embedding of one head: dimension 2i turns with 2i + 1."""
    d = x.shape[-1]
    theta = pos * 10000.0 ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    a, b = x[0::2], x[1::2]
    return torch.stack([a * theta.cos() - b * theta.sin(), b * theta.cos() + a * theta.sin()], -1).reshape(d)


def test_permute_qk_turns_hf_rotary_into_llama_cpp_rotary():
    n_head, d, hidden = 3, 8, 5
    torch.manual_seed(0)
    w, x = torch.randn(n_head * d, hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    p = eg.permute_qk(w, n_head)
    assert sorted(map(tuple, p.tolist())) == sorted(map(tuple, w.tolist()))  # the same rows, reordered
    for pos in (0, 1, 7):
        hf = torch.cat([_rope_half(h, pos) for h in (w @ x).reshape(n_head, d)])
        ours = torch.cat([_rope_pairs(h, pos) for h in (p @ x).reshape(n_head, d)])
        # the rotated vectors are the same up to the row order: q·k products, hence attention, are unchanged
        torch.testing.assert_close(eg.permute_qk(hf[:, None], n_head)[:, 0], ours)


def test_metadata_and_tensors(cli_export, tied, f32_export):
    from transformers import AutoConfig, AutoTokenizer

    folder, _ = cli_export
    cfg, tok = AutoConfig.from_pretrained(tied), AutoTokenizer.from_pretrained(tied)
    fields, tensors = _reader(folder)
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 1  # MOSTLY_F16
    assert [fields[f"llama.{k}"] for k in ("block_count", "embedding_length", "feed_forward_length",
                                           "attention.head_count", "attention.head_count_kv", "context_length",
                                           "vocab_size", "rope.dimension_count")] == [2, 32, 64, 4, 2, 256, 400, 8]
    assert fields["llama.rope.freq_base"] == cfg.rope_parameters["rope_theta"]
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    vocab = tok.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    types = fields["tokenizer.ggml.token_type"]
    special = {vocab[t] for t in SPECIAL}  # the tokenizer's added tokens, all special
    assert {types[i] for i in special} == {3} and {types[i] for i in range(len(types)) if i not in special} == {1}
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads((tied / "tokenizer.json").read_text())["model"]["merges"])
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tok.chat_template
    # tied embeddings: token_embd only; f16 matrices, f32 norms
    assert "output.weight" not in tensors and len(tensors) == 2 + 9 * 2
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["blk.1.ffn_norm.weight"].tensor_type.name == "F32"
    # untied, f32: an output layer of its own, every tensor float32
    _, tensors32 = _reader(f32_export[0] / "out")
    assert "output.weight" in tensors32 and {t.tensor_type.name for t in tensors32.values()} == {"F32"}


# --------------------------------------------------------------------------------------------------------------
# the export and its check


def test_cli_writes_the_folder_and_prints_parity(cli_export, tied):
    folder, output = cli_export
    report = json.loads((folder / "export_report.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == report["files"] == [
        "export_report.json", "export_report.md", "model.gguf", "protege.json"]
    assert (report["format"], report["gguf_type"], report["architecture"]) == ("gguf", "f16", "LlamaForCausalLM")
    p = report["parity"]
    assert p["passed"] and p["atol"] == eg.DEFAULT_ATOL["f16"] and p["max_abs_diff"] <= p["atol"]
    assert p["new_tokens"] == eg.NEW_TOKENS and p["positions"] > 4 * eg.NEW_TOKENS
    assert report["tokenization"] == {"texts": 9, "identical": True}  # 4 texts, their 4 chat prompts, CHKTXT
    assert f"to {folder} (model {report['model_bytes'] / 1e6:.1f} MB, f16)" in output
    assert f"max |logit difference| {p['max_abs_diff']:.2g} over 4 texts (tolerance 0.5)" in output
    lc = report["latency"]["llama_cpp_ms"]
    assert f"llama.cpp {lc['p50']:.2f}/{lc['p95']:.2f} ms" in output
    md = (folder / "export_report.md").read_text()
    assert "pre-tokenizer `gpt-2`" in md and "**passed**" in md and "| llama.cpp |" in md


def test_f32_matches_pytorch_in_llama_cpp(f32_export):
    """Read back independently of the export's own check: logits at every position and a greedy continuation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student, report = f32_export
    assert report.parity["max_abs_diff"] < 1e-4 and report.parity["greedy_identical"]
    assert report.latency.runtime == "llama.cpp" and report.latency.runs == report.latency.exported.runs == 3
    assert report.to_json()["latency"]["llama_cpp_ms"] == report.latency.exported.as_ms()
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    tok = AutoTokenizer.from_pretrained(student)
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                  pad_token_id=tok.pad_token_id)[0].tolist()
        ref = model(torch.tensor([expected])).logits[0].numpy()  # (T, V)
    llm = _llama(student / "out" / "model.gguf")
    try:
        assert llm.tokenize(tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False).encode(),
                            special=True) == ids
        got_ids = list(ids)
        llm.eval(got_ids)
        for _ in range(6):
            got_ids.append(int(np.argmax(llm.scores[len(got_ids) - 1])))
            llm.eval(got_ids[-1:])
        got = np.array(llm.scores[: len(got_ids)])
    finally:
        llm.close()
    assert got_ids == expected
    assert np.abs(got - ref).max() < 1e-4 and np.abs(ref).max() > 1  # logits of a real size, not all ~0


def test_served_by_llama_cpp_server(cli_export, tied):
    """The f16 file behind llama.cpp's OpenAI-compatible server answers a chat completion with the prompt
    tokenized as the student's chat template and tokenizer do."""
    import openai
    from transformers import AutoTokenizer

    folder, _ = cli_export
    tok = AutoTokenizer.from_pretrained(tied)
    prompt_ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    server = LlamaServer(gguf=folder / "model.gguf", n_ctx=256, n_threads=1)
    with server, openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=60) as client:
        r = client.chat.completions.create(model=server.model, messages=PROMPT, max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.strip()


def test_a_conversion_error_fails_and_leaves_the_previous_export(f32_export, monkeypatch):
    student, _ = f32_export
    before = _tree(student)
    monkeypatch.setattr(eg, "permute_qk", lambda w, n_head: w)  # q/k rows in Hugging Face's order
    with pytest.raises(ProtegeError, match="disagrees with PyTorch") as e:
        export_student(student, "gguf", student / "out", gguf_type="f32", runs=1)
    assert "nothing was written" in str(e.value)
    assert _tree(student) == before  # the earlier export intact, no temporary folder left


# --------------------------------------------------------------------------------------------------------------
# refusals


def test_refuses_other_architectures_with_the_onnx_alternative(tmp_path, tiny_classifier_dir):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = make_tokenizer()
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    ))
    save_model(tmp_path / "neox", neox, tok)
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "neox"), "--format", "gguf"])
    assert r.exit_code == 2
    assert "supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM students" in r.output
    assert "not GPTNeoXForCausalLM" in r.output and "--format onnx" in r.output
    with pytest.raises(ProtegeError, match="causal-LM students; BertForSequenceClassification .* --format onnx"):
        export_student(tiny_classifier_dir, "gguf", tmp_path / "bert")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neox"]  # nothing written for either
    assert not (tmp_path / "neox" / "gguf").exists()


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_students_match_pytorch_in_llama_cpp(tmp_path, family):
    """The other two families: Qwen2 (llama.cpp's qwen2: halves rotated as in Hugging Face, q/k/v biases kept)
    and Mistral (llama.cpp's llama, q/k permuted). Matrices and biases scaled up, as in _student, so a wrong
    rotary layout or a dropped bias would move the logits far past the tolerance."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = make_tokenizer()
    cls, config = (Qwen2ForCausalLM, Qwen2Config) if family == "qwen2" else (MistralForCausalLM, MistralConfig)
    torch.manual_seed(0)
    model = cls(config(  # vocab padded past the tokenizer, as real models are (transformers' Qwen2Tokenizer adds a token)
        vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=family == "qwen2",
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(10)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)  # zero-initialised: a dropped bias would otherwise go unnoticed
    student = save_student(tmp_path / "student", model, tok)
    report = export_student(student, "gguf", tmp_path / "out", gguf_type="f32", runs=2)
    p, tokenizer = report.parity, report.details["tokenizer"]
    assert p["passed"] and p["greedy_identical"] and p["max_abs_diff"] < 1e-3
    assert report.architecture == cls.__name__ and tokenizer["arch"] == ("qwen2" if family == "qwen2" else "llama")
    assert tokenizer["pre"] == ("qwen2" if family == "qwen2" else "gpt-2")
    assert report.details["tokenization"]["identical"]
    fields, tensors = _reader(tmp_path / "out")
    assert fields["general.architecture"] == tokenizer["arch"]
    has_bias = "blk.0.attn_q.bias" in tensors
    assert has_bias == (family == "qwen2")
    if family == "qwen2":  # tied: one embedding matrix, reused as the output layer
        assert "output.weight" not in tensors
        np.testing.assert_allclose(np.array(tensors["blk.0.attn_q.bias"].data),
                                   model.model.layers[0].self_attn.q_proj.bias.detach().numpy(), atol=1e-6)


def test_refuses_a_tokenizer_llama_cpp_cannot_run(tmp_path, tiny_lm_dir):
    """The conftest's Llama has a word-level tokenizer: no GGUF tokenizer model fits it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = save_student(tmp_path / "student", AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
                           AutoTokenizer.from_pretrained(tiny_lm_dir))
    with pytest.raises(ProtegeError, match="byte-level BPE tokenizers .* this one is WordLevel"):
        export_student(student, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["student"]


def test_bad_gguf_type():
    r = CliRunner().invoke(cli, ["export", ".", "--format", "gguf", "--gguf-type", "q4"])
    assert r.exit_code == 2 and "'q4' is not one of 'f16', 'f32'" in r.output


# --------------------------------------------------------------------------------------------------------------
# the real thing


@pytest.mark.slow
def test_smollm2_student_exports_and_chats_in_llama_cpp_server(tmp_path):
    """A teacher_layers student cut from the packaged SmolLM2-135M-Instruct: its GGUF carries the teacher's
    tokenizer exactly as llama.cpp's own converter wrote it for the shipped file, passes the check, and answers
    a chat completion behind llama.cpp's server (about a minute on 2 cores)."""
    import openai
    from servers import default_gguf

    from protege.recipe import build_recipe
    from protege.students.lm import build_lm_student

    recipe = build_recipe({"task": {"kind": "generation"}, "student": {"init": "teacher_layers"}})
    model, tok = build_lm_student(recipe)
    save_student(tmp_path / "student", model, tok, recipe, teacher=recipe.teacher.model)
    report = export_student(tmp_path / "student", "gguf", tmp_path / "gguf", runs=3)
    p = report.parity
    assert p["passed"] and p["max_abs_diff"] < 0.5 and report.details["tokenizer"]["pre"] == "smollm"

    ours, _ = _reader(tmp_path / "gguf")
    shipped = {k: f.contents() for k, f in gguf.GGUFReader(default_gguf()).fields.items()}
    # every hyper-parameter and tokenizer field of the shipped file but the layer count, and add_space_prefix
    # (False there): without it llama.cpp adds no space to BPE text either, as the export's tokenization check shows
    same = [k for k in shipped if k.startswith(("tokenizer.", "llama."))
            and k not in ("llama.block_count", "tokenizer.ggml.add_space_prefix")]
    assert {k: ours.get(k) for k in same} == {k: shipped[k] for k in same}
    assert ours["llama.block_count"] == model.config.num_hidden_layers < shipped["llama.block_count"]

    server = LlamaServer(gguf=tmp_path / "gguf" / "model.gguf")
    with server, openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=120) as client:
        r = client.chat.completions.create(model=server.model, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content.strip() and r.usage.completion_tokens >= 1
