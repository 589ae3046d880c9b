"""The agent's branch and training script, written only where the agent expects them to be.

Invariants (each has a test with a real repository):
- Before every git write (an experiment commit, the soft reset or revert commit that undoes one) the branch must be
  checked out at the HEAD the agent last saw; otherwise GitMoved stops the loop and nothing is touched. A user who runs
  `git checkout main` or commits during a run never gets an agent commit or reset on their branch.
- Before the training script is overwritten (a new experiment's edit, a revert, the startup restore), a working copy
  that differs from the committed version is saved to runs/rescued-<time>-<script> and named in the log: an edit
  made while a run trained is never lost.
- A commit subject "expN: revert (...)" is never taken for an experiment: a revert is never undone.
- A script that holds a known secret (in any form the Redactor knows) is never committed: commit_script and
  commit_candidate raise SkipExperiment before anything is written. Rescue copies are redacted.
- With several slots (tui.slots) a candidate is committed beside the branch (commit_candidate: no work tree, no
  branch change) and the branch moves only when one is kept (advance), under the same expect() check.
"""

import re
import time
from pathlib import Path

from tui.atomic import write_atomic
from tui.controls import SkipExperiment
from tui.credentials import Redactor
from tui.git_repo import GitRepo

EXP_SUBJECT_RE = re.compile(r"^exp(\d+):(?! revert \()")


def experiment_of(subject: str) -> int | None:
    """The experiment number of an experiment commit's subject ("exp3: raise lr"); None for anything else."""
    m = EXP_SUBJECT_RE.match(subject)
    return int(m.group(1)) if m else None


class Workspace:
    def __init__(self, git: GitRepo, script: str, branch: str, runs_dir: Path, log, redact: Redactor | None = None):
        self.git = git
        self.script = script
        self.branch = branch
        self.runs_dir = Path(runs_dir)
        self.log = log  # log(message, level)
        self.redact = redact or Redactor()
        self.head = ""  # the HEAD the agent expects; set by sync() once the branch is checked out

    @property
    def path(self) -> Path:
        return self.git.path / self.script

    def sync(self) -> str:
        self.head = self.git.head()
        return self.head

    def rescue(self, rev: str = "HEAD") -> Path | None:
        """Save the working copy of the script (redacted) when it differs from rev's; returns where it went."""
        try:
            current = self.path.read_bytes()
        except OSError:
            return None
        if current == self.git.show(rev, self.script):
            return None
        p = Path(self.script)
        dest = self.runs_dir / f"rescued-{time.strftime('%Y%m%d-%H%M%S')}-{p.name}"
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"rescued-{time.strftime('%Y%m%d-%H%M%S')}-{n}-{p.name}")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, self.redact.redact_bytes(current))
        return dest

    def _rescue_before(self, what: str) -> None:
        saved = self.rescue()
        if saved:
            self.log(f"{self.script} had changes that were not committed: saved them to {saved} before {what}",
                     "warning")

    def commit_script(self, source: str, message: str) -> str:
        """Write the new script and commit exactly that file; returns the new HEAD."""
        self._check_secret(source)
        self.git.expect(self.branch, self.head)
        self._rescue_before("writing the next experiment")
        write_atomic(self.path, source)
        self.head = self.git.commit_file(self.script, message)
        return self.head

    def _check_secret(self, source: str) -> None:
        if self.redact.finds(source):
            raise SkipExperiment(f"the edit puts a secret (an API key or token the agent knows) into {self.script}: "
                                 f"not committed")

    def commit_candidate(self, parent: str, source: str, message: str) -> str:
        """Commit the new script on top of parent beside the branch (tui.git_repo.commit_on); returns its sha."""
        self._check_secret(source)
        return self.git.commit_on(parent, self.script, source.encode("utf-8"), message)

    def advance(self, sha: str) -> None:
        """A kept candidate (a child of the expected HEAD) becomes the branch and the work tree's script."""
        self.git.expect(self.branch, self.head)
        self._rescue_before("checking out the kept experiment")
        self.git.advance_branch(self.branch, self.head, sha, self.script)
        self.head = sha

    def revert(self, sha: str, message: str) -> None:
        """Undo experiment commit sha for the script (see GitRepo.revert_experiment)."""
        self.git.expect(self.branch, self.head)
        self._rescue_before("reverting it")
        self.git.revert_experiment(sha, self.script, message)
        self.head = self.git.head()

    def restore_committed(self) -> Path | None:
        """Startup: put back the committed script when the working copy differs (saved first)."""
        saved = self.rescue()
        if saved:
            self.git.restore_file("HEAD", self.script)
        return saved
