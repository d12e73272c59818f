"""`protege compare`: the same gold-labelled sample sent to each candidate teacher through labeling's path (store,
cache, budget cap). A local tiny teacher (two settings) and an API teacher (the in-process OpenAI fake, whose answers
the test chooses, so every figure has a hand count), then llama.cpp's real server in two settings beside a local
teacher."""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import n_calls, sql, write_jsonl
from lm_fixtures import make_llama, make_tokenizer, save_model
from servers import llama_server  # noqa: F401  (fixture)

from protege.cli import cli
from protege.demo_data import LABELS
from protege.evaluation.compare import compare, compare_estimates, draw_sample
from protege.evaluation.measure import summarize_latency
from protege.recipe import load_recipe
from protege.teachers.presets import Price

PRICE = Price(0.15, 0.075, 0.60)  # gpt-4o-mini, USD per million tokens
API = "openai:gpt-4o-mini"
N = 20


def gold_of(recipe_path: Path) -> dict[str, str]:
    rows = [json.loads(x) for x in (recipe_path.parent / "data.jsonl").read_text().splitlines()]
    return {r["text"]: r["label"] for r in rows}


def hashed(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def api_answer(gold: dict[str, str]):
    """What the fake API teacher answers: gold for most texts, the next label for one in four, and for one in
    seven no label at all (a failed row after its parse retries)."""
    names = list(LABELS)

    def choose(text: str, labels) -> str | None:
        h = hashed(text)
        if h % 7 == 0:
            return None
        if h % 4 == 0:
            return names[(names.index(gold[text]) + 1) % len(names)]
        return gold[text]

    return choose


def invoke(*args: str):
    return CliRunner().invoke(cli, [*map(str, args)])


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and modification time (SQLite's -wal and -shm files: their size; reading a store in WAL
    mode touches them without writing a row)."""
    return {str(p): (p.stat().st_size, 0 if p.name.endswith(("-wal", "-shm")) else p.stat().st_mtime_ns)
            for p in path.rglob("*") if p.is_file()}


def agreement(a: list, b: list) -> float:
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return sum(x == y for x, y in both) / len(both)


def test_compare_a_local_teacher_in_two_settings_and_an_api_teacher(tiny_recipe, tiny_lm_dir, openai_fake,
                                                                    monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-compare")
    gold = gold_of(tiny_recipe)
    openai_fake.choose = api_answer(gold)
    local, uncalibrated = f"hf:{tiny_lm_dir}", f"hf:{tiny_lm_dir},calibrate=false"
    res = invoke("label", tiny_recipe, "-q")  # the recipe's own teacher labels everything first
    assert res.exit_code == 0, res.output
    recipe = load_recipe(tiny_recipe)
    db, out = recipe.store_path, recipe.output_dir
    labeled = {r["id"]: r for split in ("train", "eval")
               for r in map(json.loads, (out / "signals" / f"{split}.jsonl").read_text().splitlines())}
    calls = n_calls(db)
    teachers = ["--teacher", local, "--teacher", uncalibrated, "--teacher", API]

    # dry run: an estimate per teacher, nothing called, nothing written
    before = snapshot(out)
    res = invoke("compare", tiny_recipe, *teachers, "--sample", N, "--dry-run", "-q")
    assert res.exit_code == 0, res.output
    assert f"rows: {N}, {N} already answered in the store, 0 to call" in res.output  # labeling bought them
    assert res.output.count(f"rows: {N}, 0 already answered in the store, {N} to call") == 2
    assert openai_fake.received == 0 and n_calls(db) == calls and snapshot(out) == before

    res = invoke("compare", tiny_recipe, *teachers, "--sample", N, "--max-distance", 100, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "compare" / "compare.json").read_text())
    assert (out / "compare" / "accuracy_vs_cost.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "compare" / "compare.md").read_text()
    assert all(name in md for name in (local, uncalibrated, API))

    # the sample: N distinct gold-labelled rows drawn by the seed, a bigger sample keeping a smaller one's rows
    sample, _ = draw_sample(recipe, N)
    ids = [r["id"] for r in report["rows"]]
    assert ids == [e.id for e in sample] and len(set(ids)) == N and all(e.gold for e in sample)
    assert [e.id for e in draw_sample(recipe, 5)[0]] == ids[:5]
    texts = [e.text for e in sample]
    by = {t["name"]: t for t in report["teachers"]}
    labels = {name: [r["labels"][name] for r in report["rows"]] for name in by}

    # the recipe's own teacher: labeling's answers, from the store, nothing called
    mine = [labeled[i]["teacher_label"] for i in ids]
    assert labels[local] == mine and by[local]["called"] == 0 and by[local]["cached"] == N
    assert by[local]["accuracy"] == sum(lab == e.gold for lab, e in zip(mine, sample)) / N
    assert by[local]["label_mass"] == pytest.approx(statistics.fmean(labeled[i]["label_mass"] for i in ids))
    assert by[uncalibrated]["called"] == len(set(texts)) and by[uncalibrated]["failed"] == 0
    for name in (local, uncalibrated):
        assert by[name]["price_source"] == "compute" and by[name]["usd_per_1k"] > 0
        assert by[name]["accuracy"] == sum(lab == e.gold for lab, e in zip(labels[name], sample)) / N

    # the API teacher: its answers are the fake's choices, its money the fake's tokens at the price
    chosen = [api_answer(gold)(t, None) for t in texts]
    assert labels[API] == chosen and 0 < chosen.count(None) < N
    api = by[API]
    assert api["accuracy"] == sum(c == e.gold for c, e in zip(chosen, sample)) / N
    assert api["failed"] == chosen.count(None) and api["failure_rate"] == chosen.count(None) / N
    assert api["label_mass"] == pytest.approx(0.9)  # the fake's covered mass at the answer token
    assert api["spent_usd"] == pytest.approx(PRICE.cost(openai_fake.prompt_tokens, openai_fake.completion_tokens))
    ok = sql(db, "SELECT cost_usd, seconds FROM calls WHERE teacher = ? AND status = 'ok'", API)
    assert len(ok) == N - chosen.count(None)
    assert api["usd_per_1k"] == pytest.approx(1000 * sum(c for c, _ in ok) / len(ok))
    assert api["latency_ms_p50"] == pytest.approx(summarize_latency([s for _, s in ok]).p50)
    assert api["price_source"] == "recorded API spend"

    # agreement: on the rows both answered
    for a in by:
        assert report["agreement"][a][a] == 1.0
        for b in by:
            assert report["agreement"][a][b] == pytest.approx(agreement(labels[a], labels[b]))
    # within 100 points every teacher qualifies: the cheapest
    assert report["pick"]["name"] == min(by.values(), key=lambda t: t["usd_per_1k"])["name"]

    # a rerun makes zero calls; within 0 points only the most accurate qualify
    received = openai_fake.received
    again = compare(recipe, [local, uncalibrated, API], N, max_distance=0, quiet=True)
    assert openai_fake.received == received and n_calls(db) == calls + 2 * len(set(texts))  # a failed row too
    assert all(t["called"] == 0 for t in again["teachers"])
    assert [t["accuracy"] for t in again["teachers"]] == [by[n]["accuracy"] for n in by]
    best = max(t["accuracy"] for t in again["teachers"])
    assert again["pick"]["name"] == min((t for t in again["teachers"] if t["accuracy"] == best),
                                        key=lambda t: t["usd_per_1k"])["name"]


def test_the_budget_cap_holds_and_a_rerun_buys_only_what_is_missing(tiny_recipe, openai_fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-compare")
    gold = gold_of(tiny_recipe)
    openai_fake.choose = lambda text, labels: gold[text]
    recipe = load_recipe(tiny_recipe)
    teachers = [API, f"{API},label_method=hard_label"]
    n, estimates = compare_estimates(recipe, teachers, 30)
    assert n == 30 and not recipe.store_path.exists() and not recipe.output_dir.exists()
    worst = estimates[0][1].worst_usd / estimates[0][1].to_call
    cap = 10.5 * worst
    res = invoke("compare", tiny_recipe, *[a for t in teachers for a in ("--teacher", t)], "--sample", 30,
                 "--budget-usd", cap, "-q")
    assert res.exit_code == 3, res.output
    assert "budget" in res.output and not (recipe.output_dir / "compare").exists()
    spent = sql(recipe.store_path, "SELECT SUM(cost_usd + uncertain_usd) FROM calls")[0][0]
    assert 0 < spent <= cap and 10 <= openai_fake.answered < 30

    distinct = len({e.text for e in draw_sample(recipe, 30)[0]})
    report = compare(recipe, teachers, 30, quiet=True)  # no cap: the rest, nothing bought twice
    assert openai_fake.received == 2 * distinct == n_calls(recipe.store_path)
    assert [t["accuracy"] for t in report["teachers"]] == [1.0, 1.0]
    assert report["teachers"][1]["label_mass"] is None  # a hard label records no mass outside the labels
    assert report["agreement"][teachers[0]][teachers[1]] == 1.0


def test_bad_teachers_and_tasks_are_refused_before_anything_runs(tiny_recipe, tiny_lm_dir, tmp_path):
    for spec, message in (("hf:x,calibrate", "setting=value"), ("ensemble:mean", "members of an ensemble"),
                          (f"hf:{tiny_lm_dir},no_such=1", "no_such"), ("gpt-4", "no known prefix")):
        res = invoke("compare", tiny_recipe, "--teacher", spec, "--sample", 3)
        assert res.exit_code == 2 and message in res.output, res.output
    res = invoke("compare", tiny_recipe, "--teacher", "hf:a", "--teacher", "hf:a")
    assert res.exit_code == 2 and "given twice" in res.output
    gen = {"task": {"kind": "generation", "instruction": "Answer."},
           "data": {"path": str(tiny_recipe.parent / "data.jsonl")}, "teacher": {"model": f"hf:{tiny_lm_dir}"},
           "student": {"model": str(tiny_lm_dir)}, "output_dir": "out"}
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(gen))
    res = invoke("compare", tmp_path / "gen.yaml", "--teacher", f"hf:{tiny_lm_dir}")
    assert res.exit_code == 2 and "classification tasks" in res.output
    assert not (tiny_recipe.parent / "out").exists()


def test_compare_against_llama_cpp_in_two_settings_and_a_local_teacher(tmp_path, llama_server):  # noqa: F811
    """SmolLM2-135M behind llama.cpp's server (slow: one prompt token at a time, so four texts), asked for its
    answer's top 20 and top 2 log-probabilities, beside a tiny local teacher."""
    good, bad = ["wonderful", "excellent", "lovely", "great"], ["awful", "terrible", "boring", "dull"]
    rows = [{"id": f"r{i}", "text": f"The {['film', 'meal', 'hotel'][i % 3]} was {(good if i % 2 else bad)[i % 4]}.",
             "label": "positive" if i % 2 else "negative"} for i in range(8)]
    tok = make_tokenizer()  # byte-level: the labels are words of its own
    local = save_model(tmp_path / "lm", make_llama(tok), tok)
    write_jsonl(tmp_path / "data.jsonl", rows)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "task": {"instruction": "Is the review positive or negative?", "labels": ["positive", "negative"]},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": "openai:smol", "provider": "llamacpp", "base_url": llama_server.base_url,
                    "max_tokens": 3, "concurrency": 1, "timeout_s": 120, "parse_retries": 0, "price_input": 1.0,
                    "price_output": 2.0},
        "student": {"model": str(local), "init": "scratch", "hidden_size": 16, "num_heads": 2},
        "output_dir": "out",
    }))
    recipe = load_recipe(recipe_path)
    teachers = ["openai:smol", "openai:smol,top_logprobs=2", f"hf:{local}"]
    report = compare(recipe, teachers, 4, quiet=True)
    sample, _ = draw_sample(recipe, 4)
    by = {t["name"]: t for t in report["teachers"]}
    labels = {name: [r["labels"][name] for r in report["rows"]] for name in by}
    for name, t in by.items():
        assert t["accuracy"] == sum(lab == e.gold for lab, e in zip(labels[name], sample)) / 4
        assert t["failure_rate"] == labels[name].count(None) / 4 and t["error"] is None
        assert t["called"] == 4 and t["method"] == "label_logprobs" and 0 <= t["label_mass"] <= 1
    wide, narrow = by["openai:smol"], by["openai:smol,top_logprobs=2"]
    assert wide["failed"] < 4 and wide["failed"] <= narrow["failed"]  # a label in the top 2 is in the top 20
    for t in (wide, narrow):
        if t["failed"] < 4:
            assert t["price_source"] == "recorded API spend" and t["usd_per_1k"] > 0
            assert t["latency_ms_p95"] >= t["latency_ms_p50"] > 0
    assert by[teachers[2]]["price_source"] == "compute" and by[teachers[2]]["failed"] == 0
    for a in by:
        for b in by:
            if any(x is not None and y is not None for x, y in zip(labels[a], labels[b])):
                assert report["agreement"][a][b] == pytest.approx(agreement(labels[a], labels[b]))

    calls = n_calls(recipe.store_path)
    again = compare(recipe, teachers, 4, quiet=True)
    assert n_calls(recipe.store_path) == calls and all(t["called"] == 0 for t in again["teachers"])
    assert again["rows"] == report["rows"]


def test_a_teacher_that_refuses_is_reported_and_the_others_are_compared(tiny_recipe, openai_fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-compare")
    gold = gold_of(tiny_recipe)
    openai_fake.choose = lambda text, labels: gold[text]
    recipe = load_recipe(tiny_recipe)
    wrong, right = "openai:gpt-4o,concurrency=1", API  # one call at a time: the first is refused, no other is sent
    openai_fake.plan(["404"])
    res = invoke("compare", tiny_recipe, "--teacher", wrong, "--teacher", right, "--sample", 6, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((recipe.output_dir / "compare" / "compare.json").read_text())
    refused, ok = report["teachers"]
    assert "404" in refused["error"] and refused["failed"] == 6 and refused["usd_per_1k"] is None
    assert ok["error"] is None and ok["accuracy"] == 1.0 and report["pick"]["name"] == right
    assert openai_fake.by_kind["404"] == 1 and openai_fake.received == 1 + 6
    assert f"; refused: {refused['error']}" in res.output
    assert "gpt-4o,concurrency=1 refused" in (recipe.output_dir / "compare" / "compare.md").read_text()


def test_the_pick_is_the_cheapest_within_the_distance_of_the_best():
    from protege.evaluation.compare import _pick

    results = [{"name": "big", "accuracy": 0.90, "usd_per_1k": 10.0},
               {"name": "mid", "accuracy": 0.89, "usd_per_1k": 1.0},
               {"name": "small", "accuracy": 0.80, "usd_per_1k": 0.1},
               {"name": "down", "accuracy": 0.0, "usd_per_1k": None}]
    assert _pick(results, 2.0)["name"] == "mid" and _pick(results, 2.0)["within"] == ["big", "mid"]
    assert _pick(results, 0.5)["name"] == "big" and _pick(results, 0.5)["best"] == "big"
    assert _pick(results, 10.0)["name"] == "small"  # 0.80 is 10 points below 0.90: inside, at the edge
    assert _pick(results[3:], 100.0) is None  # a teacher that answered nothing has no price to pick by
