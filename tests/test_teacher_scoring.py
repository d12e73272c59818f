"""A teacher that scores given tokens (issue 14 point 2): the served llama.cpp teacher against the same model
run locally, the cache, the budget, and on-policy training with a served teacher.

The server is llama.cpp's (llama-cpp-python) serving the packaged SmolLM2-135M-Instruct GGUF (Q4_1); the local
model is the same GGUF loaded by transformers (``gguf_file=``, weights dequantized to float32). The two differ by
llama.cpp's quantized arithmetic (activations rounded to 8 bits in the Q4_1 dot products), hence a tolerance.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from servers import FaultProxy, LlamaServer

from protege.errors import BudgetReached
from protege.labeling.scoring import score_tokens
from protege.recipe import TeacherConfig
from protege.store import Store
from protege.teachers import make_teacher
from protege.teachers.base import ScoreRequest

# Measured on this machine over the 31 reply tokens below: |served - local| log-probability of the given token
# at most 0.35 nats (the end-of-turn token after "The answer is 4."), 0.07 on average; the tolerance leaves room
# for another CPU's kernels, and the mean must stay well under it.
TOLERANCE_MAX = 0.5  # nats, any single token
TOLERANCE_MEAN = 0.1  # nats, mean over tokens


@pytest.fixture(scope="module")
def server():
    with LlamaServer(n_ctx=1024) as s:
        yield s


@pytest.fixture(scope="module")
def local():
    """The local 'hf:' teacher on the same GGUF, and its tokenizer (the student's, in these tests)."""
    teacher = make_teacher(TeacherConfig(model="hf:smollm2-135m-instruct", dtype="float32", device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher.load()
    return teacher, teacher.model_and_tokenizer()[1]


def served_cfg(base_url: str, **kw) -> TeacherConfig:
    return TeacherConfig(model="openai:smollm2", provider="llamacpp", base_url=base_url, **kw)


def request(tok, messages, reply_ids: list[int], k: int = 5) -> ScoreRequest:
    """What on-policy training sends: the chat prompt's ids then the reply's, scored from the reply on."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"] + reply_ids
    special = set(tok.all_special_ids)
    return ScoreRequest(
        ids=tuple(ids), start=len(ids) - len(reply_ids), top_logprobs=k, tokenizer="smollm2",
        text=tok.decode(ids, clean_up_tokenization_spaces=False),
        tokens=tuple("" if i in special else tok.decode([i]) for i in ids),
    )


def replies(tok) -> list[ScoreRequest]:
    end = tok.convert_tokens_to_ids("<|im_end|>")
    said = [
        ([{"role": "user", "content": "What is 2+2?"}], "The answer is 4."),
        ([{"role": "user", "content": "Name a colour."}], "Blue is a colour, like the sky on a clear day."),
        ([{"role": "user", "content": "Say hello in French."}], "Bonjour! That is hello in French."),
    ]
    return [request(tok, m, tok(r, add_special_tokens=False)["input_ids"] + [end]) for m, r in said]


def given(tl) -> list[float | None]:
    """The given token's log-probability per position (None: not scored)."""
    return [top.get(t) for t, top in zip(tl.tokens, tl.top)]


def test_served_scores_equal_the_local_models_within_quantisation(server, local, tmp_path):
    teacher, tok = local
    reqs = replies(tok)
    mine = teacher.score(reqs)
    with Store(tmp_path / "s.db") as store:
        cfg = served_cfg(server.base_url)
        served, calls = score_tokens(make_teacher(cfg), cfg, store, reqs)
    assert calls == 3
    diffs, top1 = [], []
    for r, a, b in zip(reqs, mine, served):
        assert b is not None and b.ids == a.ids == r.ids[r.start :]
        ga, gb = given(a), given(b)
        assert all(v is not None for v in gb), "a canonical reply lines up with the server's tokens everywhere"
        diffs += [abs(x - y) for x, y in zip(ga, gb)]
        assert all(0.0 <= t <= 1.0 for t in b.tail_mass)
        # the served top-5 strings against the local top-5 ids' strings
        top1 += [max(ta, key=ta.get) == max(tb, key=tb.get) for ta, tb in zip(a.top, b.top)]
    print(f"served vs local log-prob of the given token: max {max(diffs):.4f}, mean {sum(diffs) / len(diffs):.4f} "
          f"nats over {len(diffs)} tokens; top-1 agrees at {sum(top1)}/{len(top1)}")
    assert max(diffs) <= TOLERANCE_MAX
    assert sum(diffs) / len(diffs) <= TOLERANCE_MEAN
    assert sum(top1) >= 0.9 * len(top1)


def test_a_sample_the_server_tokenizes_otherwise_is_scored_where_it_lines_up(server, local, tmp_path):
    teacher, tok = local
    hello = tok(" hello", add_special_tokens=False)["input_ids"]
    assert len(hello) == 1
    split = tok(" hel", add_special_tokens=False)["input_ids"] + tok("lo", add_special_tokens=False)["input_ids"]
    reply = tok("Well", add_special_tokens=False)["input_ids"] + split
    reply += tok(" there.", add_special_tokens=False)["input_ids"]
    r = request(tok, [{"role": "user", "content": "Greet me."}], reply)
    with Store(tmp_path / "s.db") as store:
        [tl], _ = score_tokens(make_teacher(served_cfg(server.base_url)), served_cfg(server.base_url), store, [r])
    scored = [v is not None for v in given(tl)]
    # "Well", " there", "." line up; " hel" + "lo" are " hello" to the server: not scored, never mis-scored
    assert scored == [True] + [False] * len(split) + [True] * (len(reply) - 1 - len(split))
    # The server reads the text as its tokenizer writes it: past the split, its values are the local model's on
    # the canonical tokens ("Well", " hello", " there", "."), not on the student's
    canonical = request(tok, [{"role": "user", "content": "Greet me."}], reply[:1] + hello + reply[1 + len(split) :])
    want = given(teacher.score([canonical])[0])
    got = [v for v in given(tl) if v is not None]
    assert len(got) == len(want) - 1
    assert all(abs(a - b) <= TOLERANCE_MAX for a, b in zip(got, want[:1] + want[2:]))


def test_cached_scores_make_no_call_on_a_rerun(server, local, tmp_path):
    _, tok = local
    reqs = replies(tok)
    with FaultProxy(server.base_url) as proxy, Store(tmp_path / "s.db") as store:
        cfg = served_cfg(proxy.base_url)
        first, calls = score_tokens(make_teacher(cfg), cfg, store, reqs + reqs[:1])  # a repeat is one call
        assert calls == 3 and proxy.forwarded == 3
        again, calls = score_tokens(make_teacher(cfg), cfg, store, reqs)
        assert calls == 0 and proxy.forwarded == 3
        assert again == first[:3]
        (usage,) = store.call_usage([_key(cfg, reqs[0])]).values()
        assert usage.input_tokens == len(reqs[0].ids) and usage.output_tokens == 1  # prompt tokens billed as input


def _key(cfg, r):
    from protege.store import call_key

    return call_key(make_teacher(cfg).identity, r.to_json())


def test_the_budget_cap_stops_before_a_call_that_could_pass_it(server, local, tmp_path):
    _, tok = local
    reqs = replies(tok)
    with FaultProxy(server.base_url) as proxy, Store(tmp_path / "s.db") as store:
        # $1 per million input tokens: one call's worst case (text bytes + 16) is ~$1e-4, the cap a tenth of it
        cfg = served_cfg(proxy.base_url, price_input=1.0, price_output=1.0, budget_usd=1e-5, concurrency=2)
        with pytest.raises(BudgetReached, match="budget reached"):
            score_tokens(make_teacher(cfg), cfg, store, reqs)
        assert proxy.received == 0 and store.spent() == 0.0
        # a cap that fits the worst case of exactly one call: one call is sent and billed at its usage
        worst = (len(reqs[0].text.encode()) + 16 + 1) / 1e6
        cfg = served_cfg(proxy.base_url, price_input=1.0, price_output=1.0, budget_usd=worst * 1.01, concurrency=1)
        with pytest.raises(BudgetReached):
            score_tokens(make_teacher(cfg), cfg, store, reqs[:1] + reqs[2:])
        assert proxy.received == 1
        assert math.isclose(store.spent(), (len(reqs[0].ids) + 1) / 1e6) and store.spent() <= worst * 1.01


def test_vllm_prompt_logprobs_are_read_by_id(tmp_path):
    """vLLM takes the ids themselves and answers by id (no server here: its documented body, in-process)."""
    import json

    import httpx2

    from protege.teachers.openai_api import OpenAITeacher

    ids, seen = (5, 17, 9, 17), []

    def handler(req: httpx2.Request) -> httpx2.Response:
        body = json.loads(req.content)
        seen.append((req.url.path, body))
        entry = {  # the prompt's own token, and the likeliest two (id 9 and 17 read alike: " a")
            "17": {"logprob": -0.5, "rank": 1, "decoded_token": " a"},
            "9": {"logprob": -1.5, "rank": 2, "decoded_token": " a"},
            "3": {"logprob": -3.0, "rank": 3, "decoded_token": "b"},
        }
        return httpx2.Response(200, json={
            "id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": "x", "finish_reason": "length", "logprobs": None,
                         "prompt_logprobs": [None, entry, entry, entry]}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
        })

    cfg = TeacherConfig(model="openai:m", provider="vllm")
    teacher = OpenAITeacher("m", cfg, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    r = ScoreRequest(ids=ids, start=2, top_logprobs=2, tokenizer="t")
    with Store(tmp_path / "s.db") as store:
        [tl], calls = score_tokens(teacher, cfg, store, [r])
    assert calls == 1 and seen[0][0] == "/v1/completions"
    assert seen[0][1]["prompt"] == list(ids) and seen[0][1]["prompt_logprobs"] == 2 and seen[0][1]["max_tokens"] == 1
    assert tl.ids == (9, 17) and tl.top_ids == ((17, 9, 3), (17, 9, 3))
    assert tl.top_logprobs[0] == (-0.5, -1.5, -3.0)
    assert tl.top[0][" a"] == -1.5 and tl.top[1][" a"] == -0.5  # the given token's own value under its string
    assert math.isclose(tl.tail_mass[0], 1 - math.exp(-0.5) - math.exp(-1.5) - math.exp(-3.0), rel_tol=1e-6)


# -- on-policy training with the served teacher ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, local) -> Path:
    """A random 1-layer Llama (hidden 16, tied head) with SmolLM2's own tokenizer (vocab 49,152): 0.8M
    parameters, so the served SmolLM2 reads its samples as its own tokens."""
    from lm_fixtures import save_model
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = local
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("op-student"), LlamaForCausalLM(cfg), tok)


def on_policy_recipe(base_url: str, student: Path, **training):
    from protege.recipe import build_recipe

    return build_recipe({
        "task": {"kind": "generation"},
        "teacher": {"model": "openai:smollm2", "provider": "llamacpp", "base_url": base_url, "top_logprobs": 5},
        "student": {"model": str(student), "max_length": 96},
        "training": {"distill": "on_policy", "on_policy_max_tokens": 8, "max_steps": 2, "batch_size": 2,
                     "learning_rate": 1e-2, "warmup_fraction": 0.0, "seed": 0, "temperature": 1.0, **training},
    })


def test_on_policy_from_the_served_teacher_trains_and_a_rerun_makes_no_call(server, tiny_student, tmp_path):
    from lm_fixtures import make_rows

    from protege.training.lm import train_lm

    rows = make_rows(4)
    with FaultProxy(server.base_url) as proxy, Store(tmp_path / "s.db") as store:
        recipe = on_policy_recipe(proxy.base_url, tiny_student)
        summary = train_lm(recipe, rows, tmp_path / "a", quiet=True, store=store)
        op = summary["on_policy"]
        served = op["served_teacher"]
        print("served on-policy:", served, "loss", summary["final_loss"])
        # the tokenizer probe (one prompt), then one call per sample: 2 steps x 2 samples
        assert served["score_calls"] == proxy.forwarded == 5
        assert op["sampled_steps"] == 2 and op["sampled_tokens"] > 0
        assert summary["divergence"] == "reverse_kl" and summary["alpha"] == 1.0
        assert 0.3 <= served["scored_share"] <= 1.0  # a random student's text is partly not SmolLM2's tokenization
        log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["loss"]) and r["kd_loss"] > 0 and r["ce_loss"] == 0 for r in log)
        assert math.isclose(log[-1]["loss"], log[-1]["kd_loss"], rel_tol=1e-6)
        card = (tmp_path / "a" / "README.md").read_text()
        assert "served teacher's top-k log-probabilities" in card and "local teacher" not in card
        assert log[0]["kd_loss"] == pytest.approx(hand_first_step(recipe, rows, store), rel=1e-4)
        # the same run again draws the same samples (seed and step): every score comes from the store
        again = train_lm(recipe, rows, tmp_path / "b", quiet=True, store=store)
        assert proxy.forwarded == 5 and again["on_policy"]["served_teacher"]["score_calls"] == 0
        assert again["final_loss"] == summary["final_loss"]


def hand_first_step(recipe, rows, store) -> float:
    """Step 1's KD loss (tau = 1) written out: the student's samples drawn again, the served scores read back from the store
    (no call), the teacher's alternatives mapped onto the student's ids by their text, and the reverse KL on the
    buckets [known ids, tail] per scored reply token, summed and divided by the step's reply tokens."""
    from protege.students.chat import ChatFormat
    from protege.students.lm import load_causal_lm
    from protege.training.lm import _encode, _on_policy_examples, _Served
    from protege.training.on_policy import sample_seed
    from protege.training.steps import micro_batches

    cfg = recipe.training
    model, tok = load_causal_lm(recipe.student.model)
    examples, _ = _encode(recipe, rows, tok)
    _, _, mine = micro_batches(0, len(examples), cfg.seed, cfg.batch_size, 1, 1, 0)
    parts = [[examples[i] for i in idx] for idx in mine]
    stop = ChatFormat.of(tok, model).stop_ids
    samples = _on_policy_examples(model, parts[0], stop, recipe.student.max_length, cfg, sample_seed(cfg.seed, 0, 0, 0))
    served = _Served(recipe, tok, store)
    reqs = [served.request(e.ids, e.n_prompt, recipe.teacher.top_logprobs) for e in samples]
    scores, calls = score_tokens(served.teacher, recipe.teacher, store, reqs)
    assert calls == 0
    by_text: dict[str, int] = {}
    for i, piece in enumerate(tok.batch_decode([[i] for i in range(len(tok))])):
        if "\ufffd" not in piece:
            by_text.setdefault(piece, i)
    total, count = 0.0, 0
    for e, tl in zip(samples, scores):
        with torch.no_grad():
            logq = torch.log_softmax(model(input_ids=torch.tensor([e.ids])).logits[0].double(), -1)  # (T, V)
        for j, (token, top) in enumerate(zip(tl.tokens, tl.top)):
            count += 1
            if token not in top:
                continue
            known = {e.ids[e.n_prompt + j]: top[token]}
            for s, lp in top.items():
                if s != token and s in by_text:
                    known.setdefault(by_text[s], lp)
            q = logq[e.n_prompt - 1 + j].exp()
            qk = [float(q[i]) for i in known]
            pk = [math.exp(v) for v in known.values()]
            q_tail, p_tail = 1.0 - sum(qk), max(0.0, 1.0 - sum(pk))
            total += sum(a * math.log(a / b) for a, b in zip(qk + [q_tail], pk + [p_tail]) if a > 0)
    return total / count


def test_the_other_steps_learn_the_teachers_stored_top_k(server, local, tiny_student, tmp_path):
    """At lambda < 1 the steps that do not sample are 'topk' steps on the teacher's replies (here their top-5 from
    the local model, as labeling stores them): (1 - alpha) CE + alpha KD there, divergence alone on the samples."""
    from lm_fixtures import make_rows

    from protege.students.chat import prompt_ids
    from protege.training.lm import train_lm
    from protege.training.on_policy import sampled_step

    teacher, tok = local
    rows = make_rows(4)
    reqs = []
    for r in rows:
        p = prompt_ids(tok, r.messages)
        reqs.append(ScoreRequest(ids=tuple(p + tok(r.target, add_special_tokens=False)["input_ids"]), start=len(p),
                                 top_logprobs=5, tokenizer="smollm2"))
    rows = make_rows(4, token_logprobs=teacher.score(reqs))
    seed = next(s for s in range(50) if [sampled_step(s, k, 0.5) for k in range(2)] == [True, False])
    with Store(tmp_path / "s.db") as store:
        recipe = on_policy_recipe(server.base_url, tiny_student, on_policy_fraction=0.5, alpha=0.5, seed=seed)
        summary = train_lm(recipe, rows, tmp_path / "out", quiet=True, store=store)
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in log] == [True, False]
    assert log[0]["ce_loss"] == 0 and log[1]["ce_loss"] > 0 and log[1]["kd_loss"] > 0
    assert math.isclose(log[1]["loss"], 0.5 * log[1]["ce_loss"] + 0.5 * log[1]["kd_loss"], rel_tol=1e-5)
    assert summary["topk"]["aligned_share"] == 1.0 and summary["on_policy"]["served_teacher"]["score_calls"] == 3


def test_a_served_teacher_with_another_tokenizer_is_refused(server, tmp_path):
    from lm_fixtures import make_llama, make_rows, make_tokenizer, save_model

    from protege.errors import ProtegeError
    from protege.training.lm import train_lm

    tok = make_tokenizer()  # a 400-token BPE: SmolLM2 reads its text as other tokens
    student = save_model(tmp_path / "student", make_llama(tok, layers=1, hidden=16), tok)
    with Store(tmp_path / "s.db") as store, pytest.raises(ProtegeError, match="tokenizer to be the student's"):
        train_lm(on_policy_recipe(server.base_url, student), make_rows(2), tmp_path / "out", quiet=True, store=store)


def test_echo_scores_one_position_off_are_refused():
    """llama-cpp-python lists a prompt's first token (and pairs every token with the next one's scores) when the
    prompt does not start with the model's BOS token: refused, never read one position off."""
    from types import SimpleNamespace

    from protege.errors import PermanentError
    from protege.teachers._scoring import from_echo

    r = ScoreRequest(ids=(7, 8, 9), start=1, top_logprobs=1, tokenizer="t", text="You are", tokens=("You", " are", ""))
    listed = SimpleNamespace(tokens=["You", " are", "", "x"], token_logprobs=[None, -1.0, -2.0, -0.5],
                             top_logprobs=[None, {" are": -1.0}, {"": -2.0}, {"x": -0.5}])
    with pytest.raises(PermanentError, match="one position off"):
        from_echo(listed, 3, 1, r, "llamacpp:m")
    # the same prompt after a BOS the server left out: read as it is
    listed.tokens, listed.token_logprobs[0], listed.top_logprobs[0] = [" are", "", "x"], -1.0, {" are": -1.0}
    listed.token_logprobs, listed.top_logprobs = listed.token_logprobs[1:], listed.top_logprobs[1:]
    r = ScoreRequest(ids=(1, 8, 9), start=1, top_logprobs=1, tokenizer="t", text="<s> are", tokens=("", " are", ""))
    tl = from_echo(listed, 3, 1, r, "llamacpp:m")
    assert tl.top == ({" are": -1.0}, {"": -2.0}) and tl.ids == (8, 9)
