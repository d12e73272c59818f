"""A teacher that scores given tokens (issue 14 point 2): the served llama.cpp teacher against the same model
run locally, the cache, the budget, and on-policy training with a served teacher.

The server is llama.cpp's (llama-cpp-python) serving the packaged SmolLM2-135M-Instruct GGUF (Q4_1); the local
model is the same GGUF loaded by transformers (``gguf_file=``, weights dequantized to float32). The two differ by
llama.cpp's quantized arithmetic (activations rounded to 8 bits in the Q4_1 dot products), hence a tolerance.
"""

from __future__ import annotations

import math
import warnings

import pytest
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
