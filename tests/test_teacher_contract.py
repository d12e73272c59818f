"""The teacher contract (protege.teachers.base): a stored request rebuilds to the same request and key, one
usage record, and what each kind of teacher declares it can do."""

from __future__ import annotations

import json

import pytest

from protege.errors import ProtegeError
from protege.labeling.labeler import estimate
from protege.labeling.prompts import render_generation, render_request
from protege.recipe import TaskConfig, TeacherConfig, build_recipe
from protege.store import call_key
from protege.teachers import make_teacher
from protege.teachers.anthropic_api import AnthropicBatches
from protege.teachers.base import BATCH_DISCOUNT, Request, Usage
from protege.teachers.openai_api import OpenAIBatches

CLASSIFY = TaskConfig(instruction="Classify the customer support message by its intent.", labels=["billing", "other"])
REPLY = TaskConfig(kind="generation", instruction="Reply to the customer in one sentence.")
WHY = TaskConfig(kind="generation", instruction="Reply to the customer.", answer_format="rationale")
TEXT = "I was charged twice for order 1234."
IDENTITY = {"backend": "openai", "provider": "llamacpp", "model": "smol", "method": "logprobs"}

REQUESTS = {
    "classification": render_request(CLASSIFY, TEXT),
    "classification with a rationale": render_request(CLASSIFY, TEXT, rationale=True),
    "generation": render_generation(REPLY, TEXT, 64, 5),
    "generation with a rationale": render_generation(WHY, TEXT, None, 0),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_a_stored_request_rebuilds_to_the_same_request_and_key(name):
    request = REQUESTS[name]
    stored = json.loads(json.dumps(request.to_json()))  # what the store keeps, through JSON text
    again = Request.from_json(stored)
    assert again.to_json() == request.to_json()
    assert call_key(IDENTITY, again.to_json()) == call_key(IDENTITY, request.to_json())
    assert again.generate == request.generate and again.messages == request.messages
    assert again.text == "" and Request.from_json(stored, text=request.text) == request


def test_the_rebuilt_generation_request_keeps_what_determines_the_answer():
    gen = Request.from_json(REQUESTS["generation"].to_json()).generate
    assert gen is not None and (gen.max_tokens, gen.top_logprobs, gen.rationale) == (64, 5, False)
    why = Request.from_json(REQUESTS["generation with a rationale"].to_json()).generate
    assert why is not None and why.rationale is True
    assert Request.from_json(REQUESTS["classification"].to_json()).generate is None


def test_a_malformed_stored_request_says_what_was_expected():
    good = REQUESTS["generation"].to_json()
    with pytest.raises(ValueError, match=r"not a stored request \(KeyError: 'labels'\); expected what Request.to_json"):
        Request.from_json({"messages": good["messages"]})
    with pytest.raises(ValueError, match="KeyError: 'rationale'"):
        Request.from_json({**good, "generate": {"max_tokens": 8, "top_logprobs": 0}})


def test_usage_adds_up_and_records_cached_tokens_only_when_there_are_some():
    total = Usage(100, 3, 20) + Usage(50, 2)
    assert total == Usage(150, 5, 20)
    assert total.to_json() == {"input_tokens": 150, "output_tokens": 5, "cached_input_tokens": 20}
    assert Usage(7, 1).to_json() == {"input_tokens": 7, "output_tokens": 1}


def test_api_teachers_declare_their_kind_key_and_batch_api(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    anthropic = make_teacher(TeacherConfig(model="anthropic:claude-haiku-4-5", label_method="hard_label"))
    assert (anthropic.kind, anthropic.method, anthropic.key_env) == ("api", "hard_label", "ANTHROPIC_API_KEY")
    assert isinstance(anthropic.batches(), AnthropicBatches) and anthropic.batches().discount == BATCH_DISCOUNT
    with pytest.raises(ProtegeError, match="export ANTHROPIC_API_KEY="):
        anthropic.check_key()

    local_server = TeacherConfig(model="openai:smol", provider="llamacpp", base_url="http://127.0.0.1:9/v1")
    openai = make_teacher(local_server)
    assert (openai.kind, openai.method, openai.key_env) == ("api", "logprobs", None)
    openai.check_key()  # a local server needs no key
    assert isinstance(openai.batches(), OpenAIBatches) and openai.batches().discount == BATCH_DISCOUNT
    sampled = make_teacher(local_server.model_copy(update={"label_method": "samples"}))
    with pytest.raises(ProtegeError, match="does not honour n, so label_method 'samples' cannot go through"):
        sampled.batches()


def test_the_dry_run_prices_a_batch_at_the_adapters_discount(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    rows = [{"text": f"message number {i} about my invoice", "label": "billing"} for i in range(8)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def dry_run(batch_api: bool):
        return estimate(
            build_recipe(
                {
                    "task": {"instruction": CLASSIFY.instruction, "labels": ["billing", "other"]},
                    "data": {"path": str(tmp_path / "data.jsonl")},
                    "teacher": {"model": "anthropic:claude-haiku-4-5", "label_method": "hard_label",
                                "batch_api": batch_api},
                    "output_dir": str(tmp_path / "out"),
                }
            )
        )

    live, batched = dry_run(False), dry_run(True)
    assert live.to_call == batched.to_call == 8 and live.worst_usd > 0
    assert batched.worst_usd == pytest.approx(BATCH_DISCOUNT * live.worst_usd)
    assert batched.usd == pytest.approx(BATCH_DISCOUNT * live.usd)
    assert batched.notes == ["batch API: 50% of the price, results within 24 hours"] and live.notes == []
    assert batched.method == "hard_label" and batched.key_env == "ANTHROPIC_API_KEY" and batched.key_set
