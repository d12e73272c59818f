"""Writing a benchmark's section into BENCHMARKS.md: replaced in place when it is there, appended when not."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path


def write_section(md: Path, title: str, section: str) -> None:
    """Put ``section`` (which starts with the ``title`` heading line) into ``md`` in place of the old one."""
    text = md.read_text(encoding="utf-8") if md.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip() + "\n\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    md.write_text(text, encoding="utf-8")


def provenance(command: str, note: str = "") -> str:
    """The line every section starts with: the command, the machine, the date and the commit it ran on."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (f"Command: `{command}`; machine: {os.cpu_count()} CPU cores, no GPU ({platform.machine()}){note}; "
            f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit}.")
