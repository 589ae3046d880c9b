"""After every training run, put back everything a run may not change, and say what it changed.

A run executes LLM-written code with the agent's rights, so it is treated as hostile. Integrity.take() records, at
startup after the checkout, what a run could use to cheat the evaluation, to leak a secret, or to get code of its own
run later (by the agent, by git, or by the next start of Python); verify_and_repair() compares after each run and
repairs every difference before anything is judged, committed or sent.

    what                                      recorded                     a difference                   crash
    protected files (prepare.py, backends/)   bytes and mode               restored; new files removed    yes
      and the agent's own code in the repo
    their bytecode (__pycache__/*.pyc)        purged at startup            any pyc there is removed       yes
    .git/hooks/*, .git/config                 bytes and mode               restored; new hooks removed    yes
    site-packages code (.pth .py .so ...)     size, mtime, ctime, inode    new or changed: removed        yes
                                              (+ sha256 of each .pth)
    the training script                       (the run's commit)           restored from the commit       with a secret
    site-packages bytecode (.pyc)             size, mtime, ctime, inode    new or changed: removed        no
    results.tsv                               (ResultsFile's own bytes)    rewritten with the agent's rows no

The last three are repaired with a warning but do not make the run a crash when they can be the user's doing or
another program's: an edit of the script while it trains (the workspace rescues it, tests/test_agent_races.py), a
results file opened and saved elsewhere, bytecode written by another Python sharing the environment. A script that
holds a known secret after the run is never the user's: that run is a crash. Either way nothing of the edit is
committed, and the next prompt shows the committed script.

A pyc next to a protected module is never legitimate: neither the agent (take() sets sys.dont_write_bytecode) nor a
training run (PYTHONDONTWRITEBYTECODE=1 in its environment) writes bytecode, and Python loads a pyc instead of the
source whenever its header matches the source's size and mtime: that is how a poisoned prepare.py would run. A
program can set a file's mtime back but not its ctime, so a site-packages file rewritten with its old size and mtime
is still seen. Everything removed or replaced (except bytecode) is first saved, redacted, to runs/quarantine/<run>/,
where nothing imports it: the user loses nothing, and nothing of it runs again.

Not covered (a sandbox closes these): the rest of the file system (shell startup files, other programs, git's global
config), and files written after the check by a process that escaped the run's process group.
"""

import hashlib
import os
import site
import stat
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from tui.atomic import read_regular, write_atomic

CODE_SUFFIXES = (".pth", ".py", ".so", ".pyd", ".dylib")  # what Python (or a .pth line) loads from site-packages
BYTECODE_SUFFIXES = (".pyc", ".pyo")
QUARANTINE_LIMIT = 16 << 20  # a planted file is kept (redacted) up to this size: evidence, not a second disk flood


@dataclass
class Repair:
    """What one verify_and_repair() found and undid."""
    touched: list = field(default_factory=list)  # names of what the run changed (all repaired): the run is a crash
    details: list = field(default_factory=list)  # one line per crash-making repair, for the log
    warnings: list = field(default_factory=list)  # repairs that do not make the run a crash, one line each
    where: Path | None = None  # the quarantine directory of this run
    quarantine: Path | None = None  # set to `where` once something was saved there
    seconds: float = 0.0  # how long the check took
    fatal: str | None = None  # what could not be repaired: the loop stops once the run is recorded


def scan_files(root: Path, suffixes=("",)) -> dict:
    """path -> (size, mtime_ns, ctime_ns, inode) of every file (a symlink is not followed) under root whose name ends
    in one of suffixes."""
    out, stack = {}, [str(root)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.name.endswith(suffixes):
                        s = e.stat(follow_symlinks=False)
                        out[e.path] = (s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)
                except OSError:
                    continue
    return out


def _same_file(a: tuple, b: tuple) -> bool:
    """scan_files facts of one site-packages file, before and after: size, mtime and inode. Not the ctime: a link
    made elsewhere changes it (uv installs a package into every environment as hard links to one cached copy)."""
    return (a[0], a[1], a[3]) == (b[0], b[1], b[3])


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(read_regular(path)).hexdigest()
    except OSError:
        return None


def site_dirs() -> list:
    """The directories whose code a Python started with this interpreter imports (or runs, for .pth files)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    paths = sysconfig.get_paths()
    dirs += [paths["purelib"], paths["platlib"]]
    out = []
    for d in dirs:
        p = Path(d).resolve()
        if p.is_dir() and p not in out and not any(p.is_relative_to(o) for o in out):
            out.append(p)
    return out


class Integrity:
    def __init__(self, repo, protected, workspace, results, runs_dir, redact, site: bool = True):
        self.repo = Path(repo).resolve()
        self.protected = tuple(protected)
        self.workspace = workspace  # Workspace: the script, its commits (and git), the rescue of an edit
        self.script = workspace.script
        self.git = workspace.git
        self.results = results  # ResultsFile: restore() puts back the agent's own rows
        self.runs_dir = Path(runs_dir)
        self.redact = redact  # Redactor: what is saved to the quarantine carries no secret
        self.sites: list = []
        # site=False: the runs are confined (bubblewrap: everything but their run directory is read-only to them and
        # no process of theirs outlives them), so site-packages cannot change because of a run and its ~16,000 files
        # are not scanned before and after each run
        self.scan_site = site
        # guarded files: in the work tree (protected, the agent's own code) and in .git (hooks, config), each as
        # ({absolute path: (bytes, mode)}, [directories where a new file is removed])
        self._worktree: tuple = ({}, [])
        self._gitdir: tuple = ({}, [])
        self._bytecode: list = []  # (directory, module stem or None for all of the tree) that must have no bytecode
        self._site: dict = {}  # site-packages listing, see scan_files
        self._pth: dict = {}  # site-packages .pth file -> sha256

    # -- the snapshot ---------------------------------------------------------------------------------------------

    def take(self) -> "Integrity":
        """Record the reference state (at startup, after the checkout and anything that imports the repository's
        modules); purge the protected modules' bytecode. Returns self."""
        sys.dont_write_bytecode = True  # from now on a pyc next to a guarded module is never the agent's
        self.sites = site_dirs()
        dirs = [self.repo / n for n in self.protected if (self.repo / n).is_dir()]
        singles = self._guarded_code(dirs)
        git_dir = self.git.common_dir()
        self._bytecode = [(d, None) for d in dirs] + [(p.parent, p.stem) for p in singles]
        self._worktree = (self._read(singles + [f for d in dirs for f in self._tree_files(d)]), dirs)
        hooks = git_dir / "hooks"
        self._gitdir = (self._read([git_dir / "config"] + self._tree_files(hooks)), [hooks])
        for pyc in self._find_bytecode():
            os.unlink(pyc)
        self._site = {}
        for root in self.sites if self.scan_site else ():
            self._site.update(scan_files(root, CODE_SUFFIXES + BYTECODE_SUFFIXES))
        self._pth = {p: _sha256(p) for p in self._site if p.endswith(".pth")}
        return self

    @staticmethod
    def _read(paths) -> dict:
        out = {}
        for p in paths:
            try:
                out[p] = (read_regular(p), stat.S_IMODE(p.stat().st_mode))
            except OSError:
                continue
        return out

    def describe(self) -> str:
        guarded = len(self._worktree[0]) + len(self._gitdir[0])
        names = ", ".join(self.protected)
        sites = ', '.join(map(str, self.sites)) or 'no site-packages'
        site = (f"{len(self._site)} code files in {sites}" if self.scan_site else
                f"{sites} (read-only to the sandboxed runs: not scanned)")
        return f"{guarded} guarded files ({names}, the agent's own code, .git hooks and config) and {site}"

    def _guarded_code(self, dirs: list) -> list:
        """Protected single files, and the agent's own modules that live in the repository (outside site-packages
        and the protected directories): a run that rewrote them would run its code in the next agent."""
        out = [self.repo / n for n in self.protected if (self.repo / n).is_file()]
        inside = str(self.repo) + os.sep
        outside = tuple(str(d) + os.sep for d in dirs + self.sites)  # string prefixes: thousands of modules
        script = str(self.repo / self.script)
        real_dirs: dict = {}  # ... share a few hundred directories: resolve each directory once
        for module in list(sys.modules.values()):
            f = getattr(module, "__file__", None)
            if not f or not f.endswith(".py") or not os.path.isabs(f):  # torch.ops' "_ops.py" is no file
                continue
            if os.path.islink(f):
                real = os.path.realpath(f)
            else:
                d, name = os.path.split(f)
                if d not in real_dirs:
                    real_dirs[d] = os.path.realpath(d)
                real = os.path.join(real_dirs[d], name)
            if real.startswith(inside) and not real.startswith(outside) and real != script:
                out.append(Path(real))
        return sorted(set(out))

    @staticmethod
    def _tree_files(root: Path) -> list:
        """Every file under root except bytecode (which is checked on its own)."""
        out = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            out += [Path(d) / f for f in files if not f.endswith(BYTECODE_SUFFIXES)]
        return out

    def _find_bytecode(self) -> list:
        out = []
        for d, stem in self._bytecode:
            if stem is None:
                out += [Path(r) / f for r, _, files in os.walk(d) for f in files if f.endswith(BYTECODE_SUFFIXES)]
            else:
                out += [p for p in (d / "__pycache__").glob(f"{stem}.*.py[co]") if p.is_file()]
                out += [p for p in (d / f"{stem}.pyc", d / f"{stem}.pyo") if p.is_file()]
        return sorted(set(out))

    # -- after a run ----------------------------------------------------------------------------------------------

    def verify_and_repair(self, commit: str, label: str) -> Repair:
        """Compare with the snapshot (and the script with `commit`), repair every difference; what was done."""
        t0 = time.perf_counter()
        r = Repair(where=self.runs_dir / "quarantine" / label)
        self._check_files(self._gitdir, r)
        for pyc in self._find_bytecode():
            self._remove(pyc, r, "bytecode that would run instead of its source: removed")
        self._check_site(r)
        fixed = self.results.restore()
        if fixed:
            r.warnings.append(fixed)
        # the work tree only while it is still the agent's: after a checkout or a commit by the user, GitMoved stops
        # the loop and nothing of theirs is overwritten (what the run left there shows in their git status)
        self.git.expect(self.workspace.branch, self.workspace.head)
        self._check_script(commit, r)
        self._check_files(self._worktree, r)
        r.seconds = time.perf_counter() - t0
        return r

    def _name(self, p) -> str:
        p = Path(p)
        if p.is_relative_to(self.repo):
            return p.relative_to(self.repo).as_posix()
        for root in self.sites:
            if p.is_relative_to(root):
                return f"site-packages/{p.relative_to(root).as_posix()}"
        return str(p)

    def _save(self, path: Path, r: Repair) -> None:
        """Keep a redacted, non-executable copy of what is about to be replaced or removed."""
        try:
            data = read_regular(path, QUARANTINE_LIMIT)
        except OSError:
            return
        dest = r.where / self._name(path).lstrip("/")
        write_atomic(dest, self.redact.redact_bytes(data))
        os.chmod(dest, 0o600)
        r.quarantine = r.where

    def _remove(self, path, r: Repair, why: str, save: bool = False) -> None:
        path = Path(path)
        if save:
            self._save(path, r)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        r.touched.append(self._name(path))
        r.details.append(f"{self._name(path)}: {why}")

    def _check_script(self, commit: str, r: Repair) -> None:
        path = self.repo / self.script
        committed = self.git.show(commit, self.script)
        try:
            now = read_regular(path, QUARANTINE_LIMIT)  # whole: a secret may be anywhere in it
        except OSError:
            now = None
        if now == committed:
            return
        saved = self.workspace.rescue(rev=commit)
        write_atomic(path, committed)
        what = f"{self.script}: changed while it ran" + (f" (saved to {saved}, redacted)" if saved else "")
        what += f": restored from commit {commit[:7]}"
        if now is not None and self.redact.finds(now.decode("utf-8", errors="surrogateescape")):
            r.touched.append(self.script)
            r.details.append(what + " (it held a secret)")
        else:
            r.warnings.append(what)

    def _check_files(self, guarded: tuple, r: Repair) -> None:
        files, trees = guarded
        for path, (data, mode) in files.items():
            try:
                if read_regular(path, len(data) + 1) == data:
                    continue
            except OSError:
                pass
            self._save(path, r)
            write_atomic(path, data)
            os.chmod(path, mode)
            r.touched.append(self._name(path))
            r.details.append(f"{self._name(path)}: restored")
        for tree in trees:
            for path in self._tree_files(tree):
                if path not in files:
                    self._remove(path, r, "new: removed", save=True)

    def _check_site(self, r: Repair) -> None:
        if not self.scan_site:
            return
        now = {}
        for root in self.sites:
            now.update(scan_files(root, CODE_SUFFIXES + BYTECODE_SUFFIXES))
        stray, changed = [], []
        for path, facts in now.items():
            new = path not in self._site
            pth = path in self._pth and _sha256(path) != self._pth[path]
            if not (new or pth or not _same_file(facts, self._site[path])):
                continue
            if path.endswith(BYTECODE_SUFFIXES):
                Path(path).unlink(missing_ok=True)
                stray.append(self._name(path))
            elif new or pth:  # a .pth runs at every start of Python; a new module only shadows or adds
                self._remove(path, r, ("new" if new else "changed") + ": removed (reinstall the package if it was "
                                      "yours)", save=True)
            else:  # a package's own module: removing it would break the environment, keeping it may run the run's code
                changed.append(self._name(path))
                self._site[path] = facts
                continue
            self._site.pop(path, None)
            self._pth.pop(path, None)
        if changed:
            listed = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            r.touched.extend(changed)
            r.details.append(f"{listed}: changed in place during the run (left as they are)")
            r.fatal = (f"installed packages changed while a run trained ({listed}): stopping; unless you changed "
                       f"them yourself, reinstall them (uv sync --reinstall), then start again")
        if stray:
            r.warnings.append(f"{len(stray)} bytecode files appeared in site-packages: removed, Python compiles them "
                              f"again from their source ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''})")
        for path in [p for p in self._site if p not in now]:
            del self._site[path]
            self._pth.pop(path, None)
            if not path.endswith(BYTECODE_SUFFIXES):
                r.touched.append(self._name(path))
                r.details.append(f"{self._name(path)}: deleted (reinstall the package it belonged to)")
