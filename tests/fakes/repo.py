"""Temporary git repositories for agent tests (and for the slow end-to-end test with the real trainers).

    repo = make_repo(tmp_path / "repo", {"train.py": Path("train.py"), "prepare.py": Path("prepare.py"),
                                         "backends": Path("backends")})
copies files or directories (or writes str/bytes), commits them on branch main, then adds untracked files.
"""

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAKE_TRAIN = HERE / "fake_train.py"
FAKE_PREPARE = (HERE / "fake_prepare.py").read_text()  # protected; `--evaluate DIR` scores the fake's export
FAKE_BACKENDS = '"""Fake backends package for the agent tests (protected)."""\n'
GITIGNORE = "results.tsv\nruns/\n.runner_status.json\n.agent.lock\n__pycache__/\n"
USER_TRACKED = "docs/notes.md"  # an unrelated tracked file the agent must never touch
USER_UNTRACKED = "my_scratch.txt"  # the user's untracked file


def git(repo, *args) -> str:
    p = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def _put(dest: Path, value) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, Path):
        if value.is_dir():
            shutil.copytree(value, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(value, dest)
    elif isinstance(value, bytes):
        dest.write_bytes(value)
    else:
        dest.write_text(value, encoding="utf-8")


def make_repo(path, files: dict, untracked: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "Test User")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "commit.gpgsign", "false")
    for rel, value in files.items():
        _put(path / rel, value)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    for rel, value in (untracked or {}).items():
        _put(path / rel, value)
    return path


def agent_repo(path, train_source: str | None = None) -> Path:
    """A repo with the stand-in trainer as train.py, a fake prepare.py and backends/, plus user files."""
    files = {
        "train.py": train_source if train_source is not None else FAKE_TRAIN,
        "prepare.py": FAKE_PREPARE,
        "backends/__init__.py": FAKE_BACKENDS,
        ".gitignore": GITIGNORE,
        USER_TRACKED: "# my notes\nnothing to see here\n",
    }
    return make_repo(path, files, untracked={USER_UNTRACKED: "the user's own scratch file\n"})


PROJECT = HERE.parent.parent  # the autoresearch checkout these tests live in


def project_repo(path, names=("prepare.py", "train.py", "train_mlx.py", "backends", "pyproject.toml")) -> Path:
    """A temp repo with the project's real trainers and protected files (for slow end-to-end tests)."""
    files = {n: PROJECT / n for n in names if (PROJECT / n).exists()}
    files[".gitignore"] = GITIGNORE
    files[USER_TRACKED] = "# my notes\n"
    return make_repo(path, files, untracked={USER_UNTRACKED: "the user's own scratch file\n"})


def file_state(repo, rel) -> tuple:
    p = Path(repo) / rel
    st = os.stat(p)
    return p.read_bytes(), st.st_mtime_ns


def user_files_state(repo) -> dict:
    return {rel: file_state(repo, rel) for rel in (USER_TRACKED, USER_UNTRACKED, "prepare.py",
                                                   "backends/__init__.py")}
