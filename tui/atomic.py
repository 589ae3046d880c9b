"""Files a hostile run may have touched. Write one so that a reader (or a restart after kill -9) sees the old content
or the new, never half of it; read one that a run may have swapped for a device, a FIFO or a huge file without
hanging or filling the memory; remove a tree whatever the run did to it."""

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path


def write_atomic(path, data) -> None:
    """Write str (UTF-8) or bytes to a temporary file beside `path`, fsync it, then rename it over `path`.
    The file keeps its permission bits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except OSError:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=str))


def append_atomic(path, text: str, limit: int = 16 << 20) -> None:
    """Add text to the end of a file by rewriting it whole (write_atomic): a reader never sees half a line, and what a
    run may have put in the file's place (a symlink, a FIFO) is replaced, never followed. Only a regular file's first
    `limit` bytes are kept (a small per-experiment file; anything else starts anew)."""
    try:
        old = read_regular(path, limit, follow=False)
    except OSError:
        old = b""
    write_atomic(path, old + text.encode("utf-8"))


def read_regular(path, limit: int | None = None, follow: bool = True) -> bytes:
    """The bytes of a regular file (a symlink to one is followed unless follow=False), at most `limit` of them.
    Anything else raises OSError: a run could have put /dev/zero, /dev/full or a FIFO in the file's place, which a
    plain read would read forever or wait on forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read() if limit is None else f.read(limit)


def remove_tree(path) -> None:
    """Remove what a run left, whatever it did to it: a symlink is removed, not followed; read-only directories are
    made writable first. Errors are ignored (the next run's submit tries again)."""
    def unlock(func, p, _exc):  # p could not be listed or removed: open up its directory (and itself), retry once
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass
    path = Path(path)
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path, onerror=unlock)
    except OSError:
        pass
