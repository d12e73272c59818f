"""The protege command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import yaml

from .errors import ProtegeError
from .recipe import Recipe, leaf_fields, load_recipe

def recipe_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add RECIPE and one --section.field flag per recipe setting (values are read as YAML)."""
    return click.argument("recipe", required=False, type=click.Path(dir_okay=False, path_type=Path))(
        setting_options(f))


def setting_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add -q and one --section.field flag per recipe setting (values are read as YAML)."""
    for dotted, info in reversed(leaf_fields()):
        f = click.option(
            f"--{dotted}",
            dotted.replace(".", "__"),
            default=None,
            metavar="VALUE",
            help=(info.description or "") + f" [default: {info.get_default(call_default_factory=True)!s:.40}]",
        )(f)
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars.")(f)


SETTINGS = {dotted.replace(".", "__"): dotted for dotted, _ in leaf_fields()}


def _overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """CLI flag values, read as YAML (so 0.5 is a number and [a, b] a list), keyed by dotted setting."""
    return {SETTINGS[k]: yaml.safe_load(v) for k, v in kwargs.items() if k in SETTINGS and v is not None}


def _command(f: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ProtegeError into 'error: ...' on stderr and exit code 2, with nothing else printed."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except ProtegeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for one command, unless the user set it either way; the environment is restored after,
    so a caller in the same process (a test runner, a notebook) is not left offline.

    huggingface_hub reads the variable once, when it is first imported: in a ``protege`` process that happens
    inside the command, which is what this covers (a process that imported it earlier keeps its own setting)."""
    if "HF_HUB_OFFLINE" in os.environ:
        yield
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        os.environ.pop("HF_HUB_OFFLINE", None)


def _quiet_libraries() -> None:
    """-q silences transformers' loading bars as well as ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _load(recipe: Path | None, kwargs: dict[str, Any], quiet: bool) -> Recipe:
    if quiet:
        _quiet_libraries()
    return load_recipe(recipe, _overrides(kwargs))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="protege")
def cli() -> None:
    """protege: distill any teacher model into a small student you own.

    \b
    Try it offline, no API key:   protege demo
    Your own data:                protege run recipe.yaml
    One setting from the shell:   protege run recipe.yaml --training.alpha 0.5
    """


@cli.command()
@click.option("--dry-run", is_flag=True, help="Estimate tokens and cost against the budget; call nothing.")
@recipe_options
@_command
def label(recipe: Path | None, quiet: bool, dry_run: bool, **kw: Any) -> None:
    """Label the data with the teacher (cached: a rerun makes zero calls).

    \b
    Examples:  protege label recipe.yaml --dry-run
               protege label recipe.yaml --teacher.budget_usd 5
    Exit codes: 0 done, 2 bad input or a refused request, 3 budget reached (rerun with a higher cap).
    """
    from .labeling.labeler import estimate
    from .active import label as run_label  # every text, or those teacher.select picks

    r = _load(recipe, kw, quiet)
    if dry_run:
        _print_estimate(estimate(r))
        return
    stats = run_label(r, quiet)
    click.echo(
        f"labeled {stats.examples} examples: {stats.called} teacher calls, {stats.cached} from the store "
        f"({r.store_path})"
    )
    if stats.attempts > stats.called:
        click.echo(f"  {stats.attempts} HTTP calls in all: {stats.attempts - stats.called} retries")
    if stats.cost_usd:
        click.echo(f"  spent ${stats.cost_usd:.4f} on this run")
    if stats.failed:
        click.echo(
            f"  {stats.failed} rows failed and were left out (reasons in "
            f"{r.output_dir / 'signals' / 'failed.jsonl'}); rerun to retry them"
        )


@cli.command()
@click.option("--teacher", "teachers", multiple=True, required=True, metavar="MODEL[,SETTING=VALUE...]",
              help="A teacher to compare (repeat for each): the recipe's teacher with this model, and these settings.")
@click.option("--sample", type=int, default=200, show_default=True, help="Gold-labelled texts sent to each teacher.")
@click.option("--budget-usd", type=float, default=None, help="The most this comparison may spend, all teachers "
              "together [default: teacher.budget_usd caps the store's spend, as for label].")
@click.option("--max-distance", type=float, default=2.0, show_default=True,
              help="Pick the cheapest teacher within this many accuracy points of the best.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where compare.md, compare.json and the plot go [default: <output_dir>/compare].")
@click.option("--dry-run", is_flag=True, help="Estimate each teacher's calls and cost; call nothing, write nothing.")
@recipe_options
@_command
def compare(recipe: Path | None, quiet: bool, teachers: tuple[str, ...], sample: int, budget_usd: float | None,
            max_distance: float, out: Path | None, dry_run: bool, **kw: Any) -> None:
    """Send the same gold-labelled sample to each teacher; report accuracy, cost, latency, failures, agreement.

    \b
    Examples:  protege compare recipe.yaml --teacher openai:gpt-4o-mini --teacher openai:gpt-4o --dry-run
               protege compare recipe.yaml --teacher openai:gpt-4o-mini --teacher hf:org/model,calibrate=false \\
                   --sample 300 --budget-usd 2
    Answers are cached in the run's store: a rerun makes zero calls, and `protege label` with the chosen teacher
    pays nothing for the sample again.
    Exit codes: 0 done, 2 bad input, 3 budget reached (rerun with a higher cap to continue).
    """
    from .evaluation.compare import compare as run_compare
    from .evaluation.compare import compare_estimates

    r = _load(recipe, kw, quiet)
    if dry_run:
        n, estimates = compare_estimates(r, teachers, sample, budget_usd)
        click.echo(f"{n} gold-labelled texts (seed {r.training.seed}) to each of {len(estimates)} teachers")
        for name, e in estimates:
            if name != e.teacher:  # two settings of one model: say which
                click.echo(f"--teacher {name}:")
            _print_estimate(e)
        click.echo(f"all teachers: ${sum(e.usd for _, e in estimates):.4f} expected, "
                   f"${sum(e.worst_usd for _, e in estimates):.4f} at worst")
        return
    report = run_compare(r, teachers, sample, budget_usd, max_distance, out, quiet)
    click.echo(f"{report['sample']} gold-labelled texts to each teacher")
    for t in report["teachers"]:
        price = "—" if t["usd_per_1k"] is None else f"${t['usd_per_1k']:.5f}/1k"
        click.echo(f"  {t['name']}: accuracy {100 * t['accuracy']:.1f}%, {price}, failed {t['failed']}, "
                   f"{t['called']} calls now, {t['cached']} from the store" + (f"; refused: {t['error']}" if t["error"]
                                                                              else ""))
    p = report["pick"]
    if p is not None:
        click.echo(f"pick: {p['name']} (the cheapest within {max_distance:g} points of {p['best']}, "
                   f"{100 * p['best_accuracy']:.1f}%)")
    click.echo(f"wrote {(out or r.output_dir / 'compare') / 'compare.md'}")


def _print_estimate(e: Any) -> None:
    click.echo(f"dry run for {e.teacher} (label method: {e.method}); nothing was called")
    click.echo(f"  rows: {e.rows}, {e.cached} already answered in the store, {e.to_call} to call ({e.calls} calls)")
    if e.method == "local":
        click.echo("  cost: none per token (a local model); compute time goes to the ledger")
        return
    click.echo(f"  tokens (expected): {e.input_tokens:,} in, {e.output_tokens:,} out, from {e.basis}")
    click.echo(f"  cost: ${e.usd:.4f} expected, ${e.worst_usd:.4f} at worst (every answer at max_tokens)")
    if e.budget_usd is not None:
        left = e.budget_usd - e.spent_usd
        verdict = "fits" if e.worst_usd <= left else ("may stop early" if e.usd <= left else "will stop early")
        click.echo(f"  budget: ${e.budget_usd:.4f} cap, ${e.spent_usd:.4f} spent so far, ${left:.4f} left: {verdict}")
    else:
        click.echo(f"  budget: no cap set (--teacher.budget_usd); ${e.spent_usd:.4f} spent so far")
    if e.key_env:
        click.echo(f"  API key: ${e.key_env} " + ("is set" if e.key_set else "is NOT set; export it before the run"))
    for note in e.notes:
        click.echo(f"  note: {note}")


@cli.command()
@recipe_options
@_command
def train(recipe: Path | None, quiet: bool, **kw: Any) -> None:
    """Train the student (and the hard-label baseline) on the labeled data.

    \b
    Example:  protege train recipe.yaml --training.epochs 3 --training.alpha 0.7
    """
    from .pipeline import train as run_train

    r = _load(recipe, kw, quiet)
    for name, s in run_train(r, quiet).items():
        click.echo(f"{name}: {s['steps']} steps in {s['train_seconds']:.1f}s, final loss {s['final_loss']:.4f}")


@cli.command(name="eval")
@recipe_options
@_command
def eval_(recipe: Path | None, quiet: bool, **kw: Any) -> None:
    """Compare students with the teacher on held-out data; write report.md and report.json.

    \b
    Example:  protege eval recipe.yaml
    """
    from .evaluation import evaluate

    r = _load(recipe, kw, quiet)
    _print_report(evaluate(r, quiet), r)


@cli.command()
@recipe_options
@_command
def run(recipe: Path | None, quiet: bool, **kw: Any) -> None:
    """Label, train and evaluate, skipping each stage whose inputs have not changed.

    \b
    Example:  protege run recipe.yaml --output_dir runs/try2
    """
    from .pipeline import run as run_all

    r = _load(recipe, kw, quiet)
    _print_run(run_all(r, quiet), r)


@cli.command()
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("protege-demo"), show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_command
def demo(output_dir: Path, quiet: bool) -> None:
    """The whole loop offline: an all-MiniLM-L6-v2 embedding teacher teaches a 1-layer student to sort tickets.

    \b
    Example:  protege demo --output-dir /tmp/demo
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ProtegeError(f"--output-dir {str(output_dir)!r} is a file; point it at a directory")
    with _hub_offline():  # the demo's models are packaged in wheels; set before anything imports the hub
        from .demo import demo_recipe
        from .pipeline import run as run_all

        if quiet:
            _quiet_libraries()
        r = demo_recipe(output_dir)
        _print_run(run_all(r, quiet), r)


@cli.command()
@click.argument("student_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on; beyond loopback an API key is required.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key-env", metavar="NAME", default=None, help="Environment variable holding the key clients must send as a bearer token.")
@click.option("--model-name", default=None, help="Model id to report (default: the student directory's name).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1), help="Most texts in one forward pass.")
@click.option("--max-concurrency", default=64, show_default=True, type=click.IntRange(1), help="Requests in flight before 429.")
@click.option("--max-body-bytes", default=1_000_000, show_default=True, type=click.IntRange(1), help="Larger request bodies get 413.")
@click.option("--max-tokens", "max_new_tokens", default=1024, show_default=True, type=click.IntRange(1),
              help="LM students: the most tokens one answer may ask for (max_tokens above it gets 400).")
@click.option("--cascade-threshold", type=float, default=None, metavar="P",
              help="The teacher answers where the student's confidence is below P (0: never; above 1: always): a "
                   "classifier's top label probability, a language model's geometric mean token probability. The "
                   "teacher's answers are cached in the store and count against its budget.")
@click.option("--teacher-recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Recipe of the cascade's teacher [default: the teacher and task in STUDENT_DIR/protege.json].")
@click.option("--store", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Store for the served-traffic ledger and the teacher's cache [default: the run's protege.db "
                   "beside STUDENT_DIR, when it exists].")
@click.option("--compute-usd-per-hour", type=click.FloatRange(0), default=None,
              help="Price of this machine's time, for the student's answers in the ledger [default: the student's "
                   "eval.compute_usd_per_hour, in its protege.json].")
@click.option("--teacher-timeout", "teacher_timeout_s", type=click.FloatRange(0, min_open=True), default=60.0,
              show_default=True, help="Seconds a request waits for the cascade's teacher before a 503.")
@click.option("--capture", is_flag=True,
              help="Keep each served input and answer, redacted (e-mails, phone and card numbers), in the store's "
                   "captured table for `protege improve`. Headers (the API key) are never kept.")
@click.option("--capture-max-rows", type=click.IntRange(1), default=None, metavar="N",
              help="With --capture: keep the newest N captured rows, deleting the oldest as new ones are written.")
@click.option("--capture-max-days", type=click.FloatRange(0, min_open=True), default=None, metavar="D",
              help="With --capture: delete captured rows older than D days as new ones are written.")
@click.option("--redact", multiple=True, metavar="REGEX",
              help="With --capture: also replace what this Python regex matches with <REDACTED> (repeatable).")
@click.option("--reload-interval", "reload_interval_s", type=click.FloatRange(0), default=2.0, show_default=True,
              metavar="S", help="Check STUDENT_DIR every S seconds and swap in a promoted or rolled-back student "
                                "with no request dropped (0: never).")
@click.option("--canary", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, metavar="FRACTION",
              help="Send this share of requests to the candidate (`protege improve --stage`) before promoting it; "
                   "the x-protege-version header and the ledger say which version answered.")
@click.option("--candidate", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --canary: the candidate's directory [default: the run's staged candidate in versions/].")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings only.")
@_command
def serve(student_dir: Path, host: str, port: int, api_key_env: str | None, model_name: str | None, max_batch: int,
          max_concurrency: int, max_body_bytes: int, max_new_tokens: int, cascade_threshold: float | None,
          teacher_recipe: Path | None, store: Path | None, compute_usd_per_hour: float | None,
          teacher_timeout_s: float, capture: bool, capture_max_rows: int | None, capture_max_days: float | None,
          redact: tuple[str, ...], reload_interval_s: float, canary: float | None, candidate: Path | None,
          quiet: bool) -> None:
    """Serve a trained student behind an OpenAI-style API (/v1/chat/completions, /v1/classify, /v1/models).

    A classifier answers with its label (and /v1/classify with every label's probability); a language-model
    student generates, with OpenAI's sampling settings, stop strings, streaming and logprobs. With
    --cascade-threshold an unsure student hands the request to its teacher; the x-protege-model header (and
    answered_by, and the chat completion's model) says who answered. Every answer is recorded in the store for
    `protege cost`. With --capture each input and answer is kept too, redacted, for `protege improve`; a student
    it promotes (or `protege rollback` restores) is swapped in live.

    \b
    Example:  protege serve protege-demo/student
              protege serve protege-demo/student --cascade-threshold 0.8
              protege serve protege-demo/student --capture --capture-max-days 30 --redact 'ACCT-[0-9]+'
              protege serve protege-demo/student --capture --canary 0.1   (after `protege improve --stage`)
    Then:     OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(...)
    """
    with _hub_offline():  # a saved student is local; never reach for the hub while serving
        _quiet_libraries()
        from .serve import serve as run_server

        run_server(student_dir, host, port, api_key_env, max_body_bytes=max_body_bytes,
                   max_concurrency=max_concurrency, max_batch=max_batch, model_name=model_name,
                   log_level="warning" if quiet else "info", max_new_tokens=max_new_tokens, store=store,
                   compute_usd_per_hour=compute_usd_per_hour, cascade_threshold=cascade_threshold,
                   teacher_recipe=teacher_recipe, teacher_timeout_s=teacher_timeout_s, capture=capture,
                   capture_max_rows=capture_max_rows, capture_max_days=capture_max_days, redact=redact,
                   reload_interval_s=reload_interval_s, canary=canary, candidate=candidate)


@cli.command()
@click.argument("target", metavar="RUN_DIR_OR_RECIPE", type=click.Path(exists=True, path_type=Path))
@click.option("--margin", type=click.FloatRange(0), default=0.01, show_default=True,
              help="The most the candidate may trail the current student on either held-out set (0.01: one point).")
@click.option("--holdout-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of the new traffic held out as the fresh test, labelled by the teacher.")
@click.option("--min-rows", type=click.IntRange(1), default=20, show_default=True,
              help="Fewest new captured texts worth a candidate.")
@click.option("--max-label", type=click.IntRange(0), default=None,
              help="The most new texts sent to the teacher (least sure first); answers the store holds are free "
                   "[default: all, within teacher.budget_usd].")
@click.option("--metric", type=click.Choice(["margin", "entropy"]), default="margin", show_default=True,
              help="How the student's uncertainty is measured.")
@click.option("--stage", is_flag=True, help="Keep a passing candidate back for `protege serve --canary` and "
              "`protege promote` instead of promoting it now.")
@setting_options
@_command
def improve(target: Path, quiet: bool, margin: float, holdout_fraction: float, min_rows: int,
            max_label: int | None, metric: str, stage: bool, **kw: Any) -> None:
    """Train the next student on the traffic captured by `protege serve --capture`, and promote it if it is not
    worse.

    \b
    The captured texts (or conversations) since the current version are labelled by the teacher (free where the
    store has the answer, the rest least sure first within teacher.budget_usd); a candidate is trained on the old
    training rows plus the new, compared with the current student on the fixed held-out split and on a fresh held-out slice of
    the traffic, and promoted (student/ replaced, the old one kept in versions/) only if it trails by at most
    --margin on both. The report is in RUN_DIR/improve/vN/report.md.

    \b
    Examples:  protege improve protege-demo
               protege improve runs/tickets --teacher.budget_usd 5 --max-label 500 --stage
    Settings flags (--training.epochs ...) change the candidate's training.
    Exit codes: 0 done (promoted, staged or refused: see the report), 2 bad input, 3 budget reached before the
    fresh held-out slice was labelled.
    """
    from .improve import improve as run_improve

    if quiet:
        _quiet_libraries()
    with _hub_offline():
        r = run_improve(target, margin=margin, holdout_fraction=holdout_fraction, min_rows=min_rows,
                        max_label=max_label, metric=metric, stage=stage, quiet=quiet, overrides=_overrides(kw))
    t = r["training"]
    click.echo(f"{r['version']}: trained on {t['old_rows']} rows of {r['incumbent']} + {t['new_rows']} new "
               f"({t['free']} from the store, {t['labelled_now']} labelled now, ${r['teacher_usd']:.4f})")
    for reason in r["reasons"]:
        click.echo(f"  {reason}")
    if t["stopped"]:
        click.echo(f"  stopped early: {t['stopped']}")
    verdict = {"promoted": f"promoted: {r['version']} is the student now (`protege rollback` restores "
                           f"{r['incumbent']})",
               "staged": "staged: serve it with --canary, then `protege promote`",
               "refused": f"refused: {r['incumbent']} stays the student"}[r["decision"]]
    click.echo(verdict)
    click.echo(f"report: {Path(r['run_dir']) / 'improve' / r['version'] / 'report.md'}")


@cli.command()
@click.argument("target", metavar="RUN_DIR_OR_RECIPE", type=click.Path(exists=True, path_type=Path))
@click.option("--version", "version", default=None, help="The version to promote [default: the staged candidate].")
@click.option("--force", is_flag=True, help="Promote a candidate its comparison refused.")
@_command
def promote(target: Path, version: str | None, force: bool) -> None:
    """Make a staged candidate (`protege improve --stage`) the run's student.

    \b
    Example:  protege promote protege-demo
    """
    from .improve import promote as run_promote

    old, new = run_promote(target, version, force)
    click.echo(f"promoted {new} (was {old}); a server with --reload-interval picks it up")


@cli.command()
@click.argument("target", metavar="RUN_DIR_OR_RECIPE", type=click.Path(exists=True, path_type=Path))
@_command
def rollback(target: Path) -> None:
    """Restore the student promoted before the current one.

    \b
    Example:  protege rollback protege-demo
    """
    from .improve import rollback as run_rollback

    old, new = run_rollback(target)
    click.echo(f"rolled back from {old} to {new}")


@cli.command()
@click.argument("target", metavar="RUN_DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_command
def versions(target: Path) -> None:
    """List a run's student versions: which is current, which is staged, and each one's decision."""
    import datetime

    from .versions import Versions

    v = Versions.load(target)
    if not v.versions:
        click.echo(f"{target}: one student, no versions yet (`protege improve` starts them)")
        return
    for name, e in v.versions.items():
        mark = "*" if name == v.current else ("c" if name == v.candidate else " ")
        when = datetime.datetime.fromtimestamp(e["created_at"]).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{mark} {name:<5} {when}  {e['made_by']:<15} from {e.get('parent') or '-':<5} "
                   f"{e.get('decision', '')}")


@cli.command()
@click.argument("target", metavar="RECIPE_OR_RUN_DIR", type=click.Path(path_type=Path))
@click.option("--student", default="student", show_default=True, help="Which student of the run (its directory name).")
@click.option("--compute-usd-per-hour", type=click.FloatRange(0), default=None,
              help="Price of an hour of compute for training and evaluation [default: the recipe's "
                   "eval.compute_usd_per_hour].")
@click.option("--json", "as_json", is_flag=True, help="Print the ledger as JSON.")
@_command
def cost(target: Path, student: str, compute_usd_per_hour: float | None, as_json: bool) -> None:
    """A student's whole lifetime from its run's store: what it cost to make (teacher calls, compute), what
    serving has cost (student answers, teacher fallbacks), what it saved against sending every served
    request to the teacher, and after how many requests it pays for itself.

    \b
    Example:  protege cost recipe.yaml
              protege cost protege-demo --json
    """
    import json

    from .cost import format_lifetime, lifetime

    d = lifetime(target, student, compute_usd_per_hour)
    click.echo(json.dumps(d, indent=2) if as_json else format_lifetime(d))


@cli.command()
@click.argument("student_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", default="onnx", show_default=True,
              help="Export format: onnx (onnxruntime), or gguf (llama.cpp; Llama-architecture LM students).")
@click.option("--gguf-type", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="GGUF weight type: f16 (half the size) or f32.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write (replaced whole on success) [default: STUDENT_DIR/FORMAT].")
@click.option("--atol", default=None, type=click.FloatRange(0),
              help="Largest |logit difference| from PyTorch that passes the parity check "
                   "[default: onnx 1e-4 for a classifier, 1e-3 for an LM; gguf 1e-3 for f32, 0.5 for f16].")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(1), help="Timed calls per runtime.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="CPU threads for both runtimes while timing.")
@_command
def export(student_dir: Path, fmt: str, gguf_type: str, output: Path | None, atol: float | None, runs: int,
           threads: int) -> None:
    """Export a student for the edge, checked against PyTorch (parity and CPU latency in onnxruntime or llama.cpp).

    \b
    Example:  protege export protege-demo/student --format onnx
              protege export my-lm-student --format gguf
    Writes model.onnx and the tokenizer (or model.gguf), protege.json and export_report.{json,md}; a parity
    failure writes nothing.
    """
    _quiet_libraries()
    from .export import export_student  # it loads the student with local_files_only: no hub

    r = export_student(student_dir, fmt, output, atol=atol, runs=runs, threads=threads, gguf_type=gguf_type)
    p, lat = r.parity, r.latency
    model_type, greedy = "", ""
    if fmt == "gguf":
        model_type = f", {gguf_type}"
        greedy = f", greedy {p['new_tokens']} tokens " + ("identical" if p["greedy_identical"] else "differ only at near-ties")
    pt, ex = lat.pytorch, lat.exported
    speedup = "n/a" if lat.speedup_p50 is None else f"{lat.speedup_p50:.1f}x"
    click.echo(f"exported {r.kind} student ({r.architecture}) to {r.output} (model {r.model_bytes / 1e6:.1f} MB{model_type})")
    click.echo(f"parity: max |logit difference| {p['max_abs_diff']:.2g} over {p['texts']} texts (tolerance {p['atol']:g}), "
               f"argmax agreement {100 * p['argmax_agreement']:.1f}%{greedy}")
    click.echo(f"latency, one text per call on {r.threads} thread(s), p50/p95 over {lat.runs} runs: "
               f"PyTorch {pt.p50:.2f}/{pt.p95:.2f} ms, {lat.runtime} {ex.p50:.2f}/{ex.p95:.2f} ms ({speedup} at p50)")
    click.echo(f"report: {Path(r.output) / 'export_report.md'}")


def _print_run(result: dict[str, Any], r: Recipe) -> None:
    stats = result["label"]
    click.echo(f"label: {stats.called} teacher calls, {stats.cached} answers from the store")
    for name, s in result["train"].items():
        click.echo(f"train {name}: " + ("up to date, skipped" if s.get("skipped") else f"{s['train_seconds']:.1f}s"))
    _print_report(result["report"], r)


def _print_report(report: dict[str, Any], r: Recipe) -> None:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    for key, m in report["models"].items():
        if report.get("kind") == "generation":
            quality = f"{r.task.metric or 'task metric'} {pct(m.get('task_metric'))}"
            if key != "teacher":
                kl = m.get("kl_to_teacher")
                quality += f", top-1 agreement {pct(m['top1_agreement'])}, KL {'n/a' if kl is None else f'{kl:.4f}'}"
        else:
            quality = f"accuracy {pct(m['accuracy'])}"
        click.echo(f"{key:>13}: {quality}, p50 {m['latency_ms_p50']:.1f} ms, ${m['usd_per_1k']:.5f}/1k")
    c = report.get("cascade")
    if c and c["chosen"] is not None:
        ch = c["chosen"]
        click.echo(f"      cascade: threshold {ch['threshold']:g} keeps {pct(ch['accuracy'])} against the teacher's "
                   f"{pct(c['teacher_accuracy'])}, {pct(ch['teacher_fraction'])} to the teacher, "
                   f"${ch['usd_per_1k']:.5f}/1k (`protege serve --cascade-threshold {ch['threshold']:g}`)")
    click.echo(f"report: {r.output_dir / 'report.md'}")


def main() -> None:
    """The ``protege`` executable. Its process is ours alone, so the tokenizers' thread pool is turned off here
    (it would warn and deadlock-guard after every fork of a DataLoader or server worker), not at import, where it
    would change the environment of whoever imported the module; an explicit setting is respected."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()


if __name__ == "__main__":
    main()
