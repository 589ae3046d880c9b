"""Protected files (prepare.py, backends/): snapshot at start, hash-check after every run, restore if touched.

A run that changed them is a crash, never a keep: the evaluation lives there, so changing it would be reward
hacking. The snapshot holds the bytes, so restoring works whether or not the files are tracked by git.
"""

import hashlib
import os
from pathlib import Path

from tui.atomic import write_atomic

SKIP_DIRS = {"__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo")


def _walk(repo: Path, names) -> list:
    out = []
    for name in names:
        p = repo / name
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
                out += [Path(root) / f for f in sorted(files) if not f.endswith(SKIP_SUFFIXES)]
    return out


class ProtectedFiles:
    def __init__(self, repo, names):
        self.repo = Path(repo)
        self.names = tuple(names)
        self.snapshot: dict = {}  # relative path -> bytes

    def take(self) -> "ProtectedFiles":
        self.snapshot = {p.relative_to(self.repo).as_posix(): p.read_bytes() for p in _walk(self.repo, self.names)}
        return self

    def _current(self) -> dict:
        return {p.relative_to(self.repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in _walk(self.repo, self.names)}

    def changed(self) -> list:
        """Relative paths that were modified, added or deleted since the snapshot."""
        now = self._current()
        before = {k: hashlib.sha256(v).hexdigest() for k, v in self.snapshot.items()}
        return sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))

    def restore(self) -> list:
        """Put every protected file back as it was; returns what had to be fixed."""
        fixed = self.changed()
        for rel in fixed:
            path = self.repo / rel
            if rel in self.snapshot:
                write_atomic(path, self.snapshot[rel])
            elif path.exists():
                path.unlink()
        return fixed
