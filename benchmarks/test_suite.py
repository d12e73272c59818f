"""The README's test command, timed on this tree and on an earlier commit, one after the other on one machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/test_suite.py --before dbde8a1

The earlier commit is checked out into a temporary git worktree and run with this tree's .venv, its own
sources first on the path (an editable install is shadowed by PYTHONPATH), so both runs share the interpreter,
the installed packages and the machine's load. Prints a table (wall seconds, tests passed/failed/skipped, the
slowest files) and writes it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _md import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TITLE = "## Test suite time (benchmarks/test_suite.py)"


def _run(tree: Path) -> dict:
    """pytest -q over ``tree``'s tests with ``tree``'s sources; wall time, outcome counts, seconds per file."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1"}
    cmd = [str(ROOT / ".venv/bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
           "--durations-min=0.5"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", out.splitlines()[-1])}
    per_file: dict[str, float] = defaultdict(float)
    for secs, path in re.findall(r"^([\d.]+)s (?:setup|call|teardown)\s+(tests/[^:]+)::", out, re.M):
        per_file[path] += float(secs)
    return {"wall": wall, "counts": counts, "per_file": dict(per_file), "tail": out.splitlines()[-1]}


def _commit(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the earlier commit to compare with")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            before = _run(old)
            after = _run(ROOT)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    files = sorted(set(before["per_file"]) | set(after["per_file"]),
                   key=lambda f: -max(before["per_file"].get(f, 0), after["per_file"].get(f, 0)))[:15]
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()

    def counts(r: dict) -> str:
        c = r["counts"]
        return ", ".join(f"{c[k]} {k}" for k in ("passed", "failed", "skipped", "error", "errors") if c.get(k))

    lines = [
        TITLE,
        "",
        f"`HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/test_suite.py --before {args.before}` on {date.today()}, "
        f"commit {_commit(ROOT)} against {rev}; {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. The two runs are sequential on the same machine with the same packages; "
        "pytest's own per-test times are summed by file (setup, call and teardown over 0.5 s).",
        "",
        "| | before | after | after / before |",
        "|---|---:|---:|---:|",
        f"| wall seconds | {before['wall']:.0f} | {after['wall']:.0f} | {after['wall'] / before['wall']:.2f} |",
        f"| tests | {counts(before)} | {counts(after)} | |",
        "",
        "| file | before s | after s |",
        "|---|---:|---:|",
    ]
    for f in files:
        b, a = before["per_file"].get(f), after["per_file"].get(f)
        lines.append(f"| {f} | {'' if b is None else f'{b:.0f}'} | {'' if a is None else f'{a:.0f}'} |")
    section = "\n".join(lines) + "\n"
    print(section)
    print("before:", before["tail"], "\nafter:", after["tail"])
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", TITLE, section)


if __name__ == "__main__":
    main()
