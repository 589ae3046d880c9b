"""One agent per repository: an OS file lock on <repo>/.agent.lock.

The lock is a kernel lock (flock on POSIX, msvcrt on Windows), so it disappears with its process even after kill -9:
there are no stale PID files to clean up. The file's content (pid, start time, and the training child while one
runs) is only information: for the refusal message, and so the next agent can kill a training process group that a
killed agent left behind.
"""

import json
import os
import sys
import time

LOCK_NAME = ".agent.lock"


class LockHeld(RuntimeError):
    pass


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def read_info(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


class AgentLock:
    def __init__(self, path):
        self.path = os.fspath(path)
        self.fd: int | None = None
        self.previous: dict = {}  # what the last holder wrote (e.g. a training child it left running)
        self.info: dict = {}

    def acquire(self) -> "AgentLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            info = read_info(self.path)
            who = f"pid {info.get('pid', '?')}, started {info.get('started_at', '?')}"
            raise LockHeld(f"another agent is already running in this repository ({who}); stop it first "
                           f"(one agent per repository)")
        self.fd = fd
        self.previous = read_info(self.path)
        self.info = {"pid": os.getpid(), "started_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._write()
        return self

    def update(self, **fields) -> None:
        """Record extra information (e.g. training_pid) for whoever takes the lock after us."""
        if self.fd is None:
            return
        self.info.update(fields)
        self.info = {k: v for k, v in self.info.items() if v is not None}
        self._write()

    def _write(self) -> None:
        # rewritten in place: replacing the file would create a new inode and break the lock
        data = json.dumps(self.info).encode()
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, data)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def process_create_time(pid) -> float | None:
    """pid's start time, recorded next to it: a later agent kills the pid only if it is still that process."""
    try:
        import psutil
        return psutil.Process(pid).create_time()
    except Exception:
        return None
