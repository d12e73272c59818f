"""Student versions of a run: every student that served or could serve, kept whole, and which one is current.

A run directory holds the current student in ``student/`` (what ``protege serve``, ``eval`` and ``export`` read,
as always) and every version in ``versions/vN/``, never changed once written. ``versions/versions.json`` says
which version ``student/`` is (``current``), the order they were promoted in (``history``, for rollback), a
candidate held back for a canary (``candidate``), and per version what it was made from and the decision about
it. Promoting or rolling back copies ``versions/vN`` over ``student/`` in one rename (:func:`protege._io.atomic_dir`),
so a server watching ``student/protege.json`` reloads a whole student, never half of one.

A student that ``protege train`` wrote into ``student/`` is not lost either: :meth:`Versions.sync` finds a
``student/`` whose card no version has and keeps it as the next version (made by ``protege train``).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_dir, write_json_atomic
from .errors import ProtegeError
from .students.card import CARD, card_version

__all__ = ["MANIFEST", "STUDENT_DIR", "VERSIONS_DIR", "Versions", "exclusive"]

STUDENT_DIR, VERSIONS_DIR, MANIFEST = "student", "versions", "versions.json"


@contextlib.contextmanager
def exclusive(run_dir: Path | str, what: str) -> Iterator[None]:
    """Hold the run's versions lock for ``what`` (train, improve, promote, rollback): two of them at once would
    both write the next version or ``student/``, or promote over each other. A second one is refused at once,
    with the reason."""
    from filelock import FileLock, Timeout

    path = Path(run_dir) / VERSIONS_DIR / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ProtegeError(f"another `protege train`, `improve`, `promote` or `rollback` is running on "
                           f"{str(run_dir)!r}; "
                           f"wait for it to finish, then run `protege {what}` again") from None
    try:
        yield
    finally:
        lock.release()


@dataclass
class Versions:
    """The manifest of a run's student versions (see the module), read with :meth:`load`, written with
    :meth:`save` (atomically)."""

    run_dir: Path
    current: str | None = None
    candidate: str | None = None
    history: list[str] = field(default_factory=list)  # promoted versions, oldest first; the last is current
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # promotions and rollbacks, oldest first

    @classmethod
    def load(cls, run_dir: Path | str) -> Versions:
        import json

        run_dir = Path(run_dir)
        path = run_dir / VERSIONS_DIR / MANIFEST
        if not path.is_file():
            return cls(run_dir)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls(run_dir, d["current"], d.get("candidate"), list(d["history"]), dict(d["versions"]),
                       list(d.get("events", [])))
        except (ValueError, KeyError, TypeError) as e:
            raise ProtegeError(f"{str(path)!r} is not a versions manifest protege can read ({e}); restore it from "
                               "a backup, or move it away to start the history anew from student/") from None

    def save(self) -> None:
        write_json_atomic(self.run_dir / VERSIONS_DIR / MANIFEST, {
            "current": self.current, "candidate": self.candidate, "history": self.history,
            "versions": self.versions, "events": self.events,
        })

    # ---------------------------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.run_dir / VERSIONS_DIR / name

    @property
    def student_dir(self) -> Path:
        return self.run_dir / STUDENT_DIR

    def next_name(self) -> str:
        return f"v{max((int(n[1:]) for n in self.versions), default=0) + 1}"

    def by_card(self, card: str) -> str | None:
        """The version whose card hash is ``card`` (a served row's version), if any."""
        return next((n for n, v in self.versions.items() if v["card"] == card), None)

    def sync(self) -> str:
        """Keep ``student/`` as a version if no version has its card (it is the first, or ``protege train``
        wrote a new one), make it current, and return the current version's name."""
        if not (self.student_dir / CARD).is_file():
            raise ProtegeError(f"no trained student in {str(self.student_dir)!r}; run `protege run` (or `protege "
                               "train`) first")
        card = card_version(self.student_dir)
        name = self.by_card(card)
        if name is None:
            name = self.next_name()
            with atomic_dir(self.path(name)) as tmp:
                shutil.copytree(self.student_dir, tmp, dirs_exist_ok=True)
            # trained from the run's signals alone, so none of the traffic is in it: improve reads it all again
            # (what the teacher answered before is in the store, free)
            self.versions[name] = {"card": card, "created_at": time.time(), "made_by": "protege train",
                                   "parent": self.current, "captured_through": 0}
            self.history.append(name)
            self.events.append({"at": time.time(), "action": "kept", "version": name,
                                "reason": "student/ was trained outside `protege improve`"})
            self.current, self.candidate = name, None
            self.save()
        elif name != self.current:  # student/ was put back by hand: say so, and follow it
            self.history.append(name)
            self.events.append({"at": time.time(), "action": "found", "version": name, "from": self.current})
            self.current, self.candidate = name, None
            self.save()
        return name

    def add(self, name: str, entry: dict[str, Any]) -> None:
        self.versions[name] = {"card": card_version(self.path(name)), "created_at": time.time(), **entry}
        self.save()

    def promote(self, name: str, reason: str, action: str = "promoted") -> None:
        """Put version ``name`` in ``student/`` (one rename) and make it current."""
        if name not in self.versions:
            raise ProtegeError(f"no version {name!r} in {str(self.run_dir)!r}; `protege versions "
                               f"{self.run_dir}` lists them")
        with atomic_dir(self.student_dir) as tmp:
            shutil.copytree(self.path(name), tmp, dirs_exist_ok=True)
        self.events.append({"at": time.time(), "action": action, "version": name, "from": self.current,
                            "reason": reason})
        if action == "rolled back":
            self.history.pop()
        else:
            self.history.append(name)
        self.current = name
        self.candidate = None  # it was compared with the student it no longer competes with
        self.save()

    def rollback(self) -> tuple[str, str]:
        """Restore the version promoted before the current one; (from, to)."""
        if len(self.history) < 2:
            raise ProtegeError(f"{str(self.run_dir)!r} has no earlier version to roll back to (history: "
                               f"{', '.join(self.history) or 'empty'})")
        old, new = self.history[-1], self.history[-2]
        self.promote(new, f"rollback from {old}", action="rolled back")
        return old, new
