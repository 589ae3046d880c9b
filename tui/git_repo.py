"""Git through subprocess with timeouts: exactly the operations the agent needs, nothing that touches other files.

Reverting an experiment restores the training script alone (from the experiment's parent) and, when the experiment
commit is HEAD and not on any remote, drops that commit with a soft reset: no other tracked file and no untracked
file is ever touched. Each experiment commit stays reachable under refs/autoresearch/<tag>/expN so its diff can be
shown later even after it was dropped from the branch.

With several candidates in flight (--workers N > 1, tui.slots) a candidate never touches the work tree or the branch
while it trains: commit_on() writes its commit through a temporary index on top of the best commit, and only a keep
moves the branch to it (advance_branch). reapply() carries a candidate over to a newer best with a three-way merge
of the script (git merge-file on the blobs: base = the candidate's parent, ours = the new best, theirs = the
candidate).

Every git call runs with hooks and the fsmonitor disabled (a training run is LLM-written code: it may have installed
.git/hooks/* or a fsmonitor command, which git would otherwise run for us) and in a scrubbed environment: no
secret-named or provider variable, no GIT_* variable from outside (GIT_DIR, GIT_CONFIG_*, ... would redirect or
reconfigure git) except the commit identity.
"""

import os
import re
import subprocess
import tempfile
from pathlib import Path

from tui.credentials import scrub_env

GIT_TIMEOUT = 30.0
SAFE_CONFIG = ("-c", f"core.hooksPath={os.devnull}", "-c", "core.fsmonitor=false")
IDENTITY_VARS = ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL")
REF_NAMESPACE = "refs/autoresearch"
FALLBACK_IDENTITY = {"GIT_AUTHOR_NAME": "autoresearch", "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
                     "GIT_COMMITTER_NAME": "autoresearch", "GIT_COMMITTER_EMAIL": "autoresearch@localhost"}
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class GitError(RuntimeError):
    pass


class GitMoved(GitError):
    """The branch or HEAD is not where the agent left it: somebody else changed the repository."""


def validate_tag(tag: str) -> str:
    """A tag becomes part of the branch autoresearch/<tag>: keep it to a plain, safe ref component."""
    if not TAG_RE.match(tag or "") or ".." in tag or tag.endswith((".", ".lock")):
        raise ValueError(f"invalid --tag {tag!r}: use letters, digits, '.', '_' or '-' (e.g. --tag mar17)")
    return tag


class GitRepo:
    def __init__(self, path, timeout: float = GIT_TIMEOUT):
        self.path = Path(path)
        self.timeout = timeout
        self._identity_env: dict | None = None

    # -- plumbing --------------------------------------------------------------

    def _git(self, args, env: dict | None = None, data: bytes | None = None) -> subprocess.CompletedProcess:
        """The one place git is started (bytes in and out): hooks off, scrubbed environment (see the module
        docstring)."""
        full_env = {k: v for k, v in scrub_env(os.environ).items()
                    if not k.upper().startswith("GIT_") or k in IDENTITY_VARS}
        full_env.update(env or {})
        try:
            stdin = {"input": data} if data is not None else {"stdin": subprocess.DEVNULL}
            return subprocess.run(["git", *SAFE_CONFIG, *args], cwd=self.path, capture_output=True,
                                  timeout=self.timeout, env=full_env, **stdin)
        except FileNotFoundError:
            raise GitError("git is not installed or not on PATH") from None
        except subprocess.TimeoutExpired:
            raise GitError(f"git {' '.join(args)} timed out after {self.timeout:.0f}s") from None

    def run(self, *args, check: bool = True, env: dict | None = None, data: bytes | None = None) -> str:
        p = self._git(args, env, data)
        out = p.stdout.decode("utf-8", errors="replace")
        if check and p.returncode != 0:
            msg = (p.stderr.decode("utf-8", errors="replace").strip() or out.strip()).splitlines()
            raise GitError(f"git {' '.join(args)} failed: {msg[-1] if msg else f'exit code {p.returncode}'}")
        return out

    def expect(self, branch: str, head: str) -> None:
        """Raise GitMoved unless `branch` is checked out at `head`: called before every write, so a user who checked
        out another branch or committed while an experiment trained never gets our commit or reset on top."""
        now_branch, now_head = self.current_branch(), self.head()
        if now_branch != branch:
            raise GitMoved(f"the repository is on {now_branch!r}, not on {branch!r} where the agent works (was it "
                           f"checked out during the experiment?); nothing was changed: check out {branch} and start "
                           f"the agent again to resume")
        if now_head != head:
            raise GitMoved(f"{branch} moved from {head[:7]} to {now_head[:7]} while the agent worked (a commit or "
                           f"reset by someone else?); nothing was changed: start the agent again to resume from there")

    def ok(self, *args) -> bool:
        """True when the git command exits 0 (for yes/no questions such as diff --quiet)."""
        return self._git(args).returncode == 0

    def is_repo(self) -> bool:
        try:
            return self.run("rev-parse", "--is-inside-work-tree", check=False).strip() == "true"
        except GitError:
            return False

    def common_dir(self) -> Path:
        """Where hooks and config live (.git, or the main repository's for a worktree)."""
        return (self.path / self.run("rev-parse", "--git-common-dir").strip()).resolve()

    def has_commits(self) -> bool:
        return bool(self.run("rev-parse", "--verify", "-q", "HEAD", check=False).strip())

    # -- queries ----------------------------------------------------------------

    def head(self, short: bool = False) -> str:
        return self.run("rev-parse", *(["--short=7"] if short else []), "HEAD").strip()

    def short(self, rev: str) -> str:
        return self.run("rev-parse", "--short=7", rev).strip()

    def current_branch(self) -> str:
        return self.run("rev-parse", "--abbrev-ref", "HEAD").strip()

    def head_subject(self) -> str:
        return self.run("log", "-1", "--format=%s").strip()

    def branch_exists(self, branch: str) -> bool:
        return bool(self.run("rev-parse", "--verify", "-q", f"refs/heads/{branch}", check=False).strip())

    def is_tracked(self, path: str) -> bool:
        return bool(self.run("ls-files", "--", path).strip())

    def dirty_tracked_files(self) -> list[str]:
        """Tracked files with staged or unstaged changes (untracked files are the user's business, never ours)."""
        out = self.run("status", "--porcelain=v1", "-z", "--untracked-files=no")
        files, entries = [], out.split("\0")
        i = 0
        while i < len(entries):
            entry = entries[i]
            if len(entry) > 3:
                files.append(entry[3:])
                if entry[0] in "RC":  # renames carry the old path as the next entry
                    i += 1
            i += 1
        return files

    def on_remote(self, rev: str) -> bool:
        return bool(self.run("branch", "-r", "--contains", rev, check=False).strip())

    def show(self, rev: str, path: str) -> bytes:
        p = self._git(["show", f"{rev}:{path}"])
        if p.returncode != 0:
            raise GitError(f"git show {rev}:{path} failed: {p.stderr.decode(errors='replace').strip()}")
        return p.stdout

    def archive(self, rev: str) -> bytes:
        """A tar of the files tracked at `rev` (nothing untracked, ignored or uncommitted), e.g. for another node."""
        p = self._git(["archive", "--format=tar", rev])
        if p.returncode != 0:
            raise GitError(f"git archive {rev} failed: {p.stderr.decode(errors='replace').strip()}")
        return p.stdout

    def diff(self, rev: str, path: str | None = None) -> str:
        """The diff an experiment commit introduced (for the dashboard's diff view)."""
        return self.run("show", "--format=%h %s%n", rev, *(["--", path] if path else []))

    # -- changes ------------------------------------------------------------------

    def _commit_env(self) -> dict:
        """Use the user's identity; fall back to a neutral one so a fresh machine does not stop the loop."""
        if self._identity_env is None:
            name = self.run("config", "user.name", check=False).strip()
            email = self.run("config", "user.email", check=False).strip()
            self._identity_env = {} if (name and email) else dict(FALLBACK_IDENTITY)
        return self._identity_env

    def checkout_branch(self, branch: str) -> bool:
        """Check out branch, creating it from HEAD when it does not exist. Returns True when it was created."""
        if self.branch_exists(branch):
            if self.current_branch() != branch:
                self.run("checkout", "-q", branch)
            return False
        self.run("checkout", "-q", "-b", branch)
        return True

    def commit_file(self, path: str, message: str) -> str:
        """Commit exactly one path (other staged changes stay staged, uncommitted). Returns the new HEAD sha."""
        self.run("add", "--", path)
        self.run("-c", "commit.gpgsign=false", "commit", "-q", "--no-verify", "-m", message, "--", path,
                 env=self._commit_env())
        return self.head()

    def keep_ref(self, tag: str, exp: int, sha: str, run: int = 0) -> None:
        name = f"{REF_NAMESPACE}/{tag}/exp{exp}" + (f"-r{run}" if run else "")
        self.run("update-ref", name, sha)

    def restore_file(self, rev: str, path: str) -> None:
        """Index and work-tree copy of one path back to rev; nothing else changes."""
        self.run("restore", f"--source={rev}", "--staged", "--worktree", "--", path)

    def revert_experiment(self, sha: str, path: str, message: str) -> str:
        """Undo experiment commit `sha` for `path`. Returns 'dropped' or 'reverted'."""
        if self.head() == sha and not self.on_remote(sha):
            # restore first, then move HEAD: a crash in between leaves HEAD on the experiment commit, which the
            # next start recognises as interrupted and reverts again
            self.restore_file(f"{sha}^", path)
            self.run("reset", "-q", "--soft", f"{sha}^")
            return "dropped"
        self.restore_file(f"{sha}^", path)
        if not self.ok("diff", "--quiet", "HEAD", "--", path):
            self.run("-c", "commit.gpgsign=false", "commit", "-q", "--no-verify", "-m", message, "--", path,
                     env=self._commit_env())
        return "reverted"

    # -- candidates beside the branch (tui.slots) ---------------------------------------------------------------

    def commit_on(self, parent: str, path: str, content: bytes, message: str) -> str:
        """A commit whose tree is parent's with `path` replaced by `content`, on no branch and without touching the
        index or the work tree (a temporary index). Returns its sha."""
        blob = self.run("hash-object", "-w", "--stdin", data=content).strip()
        entry = self.run("ls-tree", parent, "--", path).split()
        mode = entry[0] if entry else "100644"  # an executable script stays executable
        with tempfile.TemporaryDirectory(prefix="autoresearch-index-") as tmp:
            env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
            self.run("read-tree", parent, env=env)
            self.run("update-index", "--add", "--cacheinfo", f"{mode},{blob},{path}", env=env)
            tree = self.run("write-tree", env=env).strip()
        return self.run("-c", "commit.gpgsign=false", "commit-tree", tree, "-p", parent, "-m", message,
                        env=self._commit_env()).strip()

    def reapply(self, sha: str, onto: str, path: str, message: str) -> str | None:
        """Candidate `sha` (one commit changing `path`) carried over to `onto`: a three-way merge of the script.
        Returns the new commit, or None when the change no longer applies (a conflict)."""
        base, theirs, ours = (self.show(rev, path) for rev in (f"{sha}^", sha, onto))
        with tempfile.TemporaryDirectory(prefix="autoresearch-merge-") as tmp:
            files = []
            for name, data in (("ours", ours), ("base", base), ("theirs", theirs)):
                files.append(os.path.join(tmp, name))
                with open(files[-1], "wb") as f:
                    f.write(data)
            p = self._git(["merge-file", "-p", "-q", *files])
        if p.returncode != 0:  # >0: conflicts; <0: an error, which also means it does not apply
            return None
        return self.commit_on(onto, path, p.stdout, message)

    def advance_branch(self, branch: str, old: str, new: str, path: str) -> None:
        """Move `branch` (checked out at `old`, the caller has checked) to `new`, a commit on top of old that changes
        only `path`: the script first, then the ref (a kill in between leaves a work-tree change that the next start
        rescues and restores), with old as the expected value so a concurrent move fails."""
        self.restore_file(new, path)
        self.run("update-ref", "-m", "autoresearch: keep", f"refs/heads/{branch}", new, old)
