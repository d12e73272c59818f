"""`protege serve`'s Prometheus metrics: the tiny classifier student served with a cascade to an API teacher (the
in-process OpenAI fake), traffic answered by the student, the teacher, both, and neither, then ``/metrics``
scraped, parsed with prometheus_client's own parser, and held to what was sent and to the store's served ledger."""

from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter
from pathlib import Path

import httpx2
import pytest
import yaml
from conftest import served, sql
from test_serve import NAME, TEXTS, running, student_dir  # noqa: F401  (fixture)

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from protege.demo_data import LABELS, make_examples
from protege.serve import Classifier, create_app

HOLD = "please hold this request #hold"  # the forward hook waits on this text, so a request stays in flight


def scrape(srv, **headers) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value} of every sample ``/metrics`` shows."""
    with httpx2.Client(base_url=srv.url, timeout=20) as http:
        resp = http.get("/metrics", headers=headers)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(metrics, name: str, **labels) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def teacher_recipe(path: Path) -> Path:
    recipe = {"task": {"instruction": "Classify the customer support message by its intent.", "labels": LABELS},
              "data": {"path": "unused.jsonl"},
              "teacher": {"model": "openai:gpt-4o-mini", "max_retries": 0}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_metrics_count_what_was_sent_and_add_up_to_the_served_ledger(student_dir, tmp_path, openai_fake,  # noqa: F811
                                                                     monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    db = tmp_path / "protege.db"
    texts = TEXTS[:6]
    # a threshold in the widest gap between the student's own confidences: half its texts go to the teacher
    clf = Classifier(student_dir)

    def confidence(text: str) -> float:
        return math.exp(max(clf.predict([text])[0][0]))

    conf = sorted(map(confidence, texts))
    gap = max(range(2, len(conf) - 1), key=lambda i: conf[i] - conf[i - 1])
    threshold = (conf[gap - 1] + conf[gap]) / 2
    low = [t for t in texts if confidence(t) < threshold]
    high = [t for t in texts if t not in low]
    assert len(low) >= 2 and len(high) >= 2
    # a text the teacher has not seen, which the student is unsure of: the teacher will refuse it
    refused = next(r["text"] for r in make_examples(60, seed=12)
                   if r["text"] not in texts and confidence(r["text"]) < threshold)
    hold_by = "student" if confidence(HOLD) >= threshold else "teacher"

    release, held = threading.Event(), threading.Event()

    def hook(batch: list[str]) -> None:
        if HOLD in batch:
            held.set()
            assert release.wait(20)

    sent: Counter[tuple[str, str, str]] = Counter()  # (endpoint, status, answered_by) of every request
    with running(student_dir, store=db, cascade_threshold=threshold, teacher_recipe=teacher_recipe(tmp_path / "t.yaml"),
                 forward_hook=hook) as srv, httpx2.Client(base_url=srv.url, timeout=20) as http:

        def chat(text: str, **kw) -> httpx2.Response:
            return http.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user",
                                                                                        "content": text}], **kw})

        for t in high + low:  # one chat per text: the student answers the sure ones, the teacher the rest
            r = chat(t)
            assert r.status_code == 200
            sent["chat.completions", "200", r.headers["x-protege-model"]] += 1
        assert sent == {("chat.completions", "200", "student"): len(high),
                        ("chat.completions", "200", "teacher"): len(low)}
        r = chat(high[0], stream=True)  # a streamed answer is counted (and timed) too
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        sent["chat.completions", "200", "student"] += 1
        r = http.post("/v1/classify", json={"input": texts})  # one request, six answers, by both
        assert r.status_code == 200 and r.headers["x-protege-model"] == "mixed"
        sent["classify", "200", "mixed"] += 1
        openai_fake.plan(["400"])  # the teacher refuses a new text: 502, a ledger row answered by no one
        r = chat(refused)
        assert r.status_code == 502 and r.json()["error"]["code"] == "teacher_refused"
        sent["chat.completions", "502", "none"] += 1
        assert chat("").status_code == 400  # bad input: no answer, no ledger row
        sent["chat.completions", "400", "none"] += 1
        assert http.get("/v1/models").status_code == 200
        sent["models", "200", "none"] += 1
        assert http.get("/v2/anything").status_code == 404
        sent["other", "404", "none"] += 1

        # a request in flight shows in the gauge while it waits
        with httpx2.Client(base_url=srv.url, timeout=20) as other:
            waiting = threading.Thread(target=lambda: other.post("/v1/classify", json={"input": HOLD}))
            waiting.start()
            assert held.wait(20)
            assert value(scrape(srv), "protege_requests_in_flight") == 1
            release.set()
            waiting.join(20)
        sent["classify", "200", hold_by] += 1

        m = scrape(srv)
    rows = served(db)  # written by the ledger, whose last rows land when the server stops

    # requests: exactly what was sent, by endpoint, status and who answered; each timed once
    requests = {k: v for k, v in m["protege_requests_total"].items() if v}
    assert requests == {(("answered_by", by), ("endpoint", e), ("status", s)): n for (e, s, by), n in sent.items()}
    by_route: Counter[tuple[str, str]] = Counter()
    for (e, _, by), n in sent.items():
        by_route[e, by] += n
    for (e, by), n in by_route.items():
        assert value(m, "protege_request_duration_seconds_count", endpoint=e, answered_by=by) == n
        assert value(m, "protege_request_duration_seconds_bucket", endpoint=e, answered_by=by, le="+Inf") == n
    assert value(m, "protege_request_duration_seconds_sum", endpoint="chat.completions", answered_by="teacher") > 0
    assert value(m, "protege_requests_in_flight") == 0

    # answers: the ledger's rows, by endpoint and who answered; the confidence and the teacher's spend are its too
    ledger = Counter((r["endpoint"], r["answered_by"]) for r in rows)
    assert ledger == {("chat.completions", "student"): len(high) + 1, ("chat.completions", "teacher"): len(low),
                      ("chat.completions", "none"): 1, ("classify", "student"): len(high) + (hold_by == "student"),
                      ("classify", "teacher"): len(low) + (hold_by == "teacher")}
    answers = {k: v for k, v in m["protege_answers_total"].items() if v}
    assert answers == {(("answered_by", by), ("endpoint", e)): n for (e, by), n in ledger.items()}
    for endpoint in ("chat.completions", "classify"):
        mine = [r["confidence"] for r in rows if r["endpoint"] == endpoint]
        assert value(m, "protege_student_confidence_count", endpoint=endpoint) == len(mine)
        assert value(m, "protege_student_confidence_sum", endpoint=endpoint) == pytest.approx(sum(mine), rel=1e-9)
        under = sum(c <= 0.5 for c in mine)
        assert value(m, "protege_student_confidence_bucket", endpoint=endpoint, le="0.5") == under
    spend = sum(r["teacher_usd"] for r in rows)
    ((spent,),) = sql(db, "SELECT SUM(cost_usd + uncertain_usd) FROM calls")
    assert spend > 0 and spend == pytest.approx(spent, rel=1e-9)  # every new teacher call was behind a served answer
    assert value(m, "protege_teacher_spend_usd_total") == pytest.approx(spend, rel=1e-9)

    # the served model, from its card
    (info,) = [dict(k) for k in m["protege_model_info"]]
    version = hashlib.sha256((student_dir / "protege.json").read_bytes()).hexdigest()[:12]
    assert info == {"model": NAME, "student": NAME, "kind": "classifier", "version": version,
                    "cascade_threshold": f"{threshold:g}", "canary_version": "", "canary_fraction": ""}


def test_each_app_counts_alone_and_the_key_guards_metrics(student_dir, tmp_path):  # noqa: F811
    with running(student_dir, store=tmp_path / "a.db", api_key="sk-k") as a, running(student_dir, store=None) as b:
        with httpx2.Client(base_url=a.url, timeout=20) as http:
            assert http.get("/metrics").status_code == 401  # the API key guards the metrics too
            assert http.get("/v1/models").status_code == 401
            auth = {"authorization": "Bearer sk-k"}
            assert http.post("/v1/classify", json={"input": TEXTS[:3]}, headers=auth).status_code == 200
        ma, mb = scrape(a, authorization="Bearer sk-k"), scrape(b)
    assert value(ma, "protege_requests_total", endpoint="models", status="401", answered_by="none") == 1
    assert value(ma, "protege_requests_total", endpoint="classify", status="200", answered_by="student") == 1
    assert value(ma, "protege_answers_total", endpoint="classify", answered_by="student") == 3
    assert sum(mb.get("protege_requests_total", {}).values()) == 0  # the other app's registry saw nothing
    assert sum(mb.get("protege_answers_total", {}).values()) == 0
    assert [dict(k)["cascade_threshold"] for k in mb["protege_model_info"]] == [""]
    assert len(served(tmp_path / "a.db")) == 3


def test_metrics_are_left_out_of_the_openapi_schema(student_dir):  # noqa: F811
    app = create_app(student_dir, store=None)
    assert "/metrics" not in app.openapi()["paths"]
