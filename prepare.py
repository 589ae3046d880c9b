"""
One-time data preparation for autoresearch, and the fixed runtime utilities the trainers import.
The agent never edits this file.

Usage:
    uv run prepare.py                        # climbmix: 10 train shards + the pinned val shard, tokenizer, token cache
    uv run prepare.py --num-shards 4         # fewer shards (-1 = all 6542)
    uv run prepare.py --text notes/ '*.md'   # offline: import local .txt/.md/.jsonl/.parquet as dataset "local"
    AUTORESEARCH_DATASET=local uv run train.py
    python -I prepare.py --evaluate RUN_DIR  # the agent loop's sealed evaluation of a trainer's export_model()

Environment (all optional):
    AUTORESEARCH_CACHE_DIR     where data lives (default ~/.cache/autoresearch)
    AUTORESEARCH_DATASET       which prepared dataset the trainers use (default climbmix)
    AUTORESEARCH_PROFILE       evaluation profile: gpu | apple | cpu (default: `prepare.py --profile`'s choice, else the
                               backend's: gpu for cuda, apple for mlx/mps on Apple Silicon, cpu for cpu and Linux mlx)
    HF_ENDPOINT                Hugging Face endpoint or mirror (default https://huggingface.co)
    AUTORESEARCH_TIME_BUDGET   training seconds (default 300; tests and smoke runs shrink it)
    AUTORESEARCH_EVAL_TOKENS   evaluation tokens (default from the profile; tests shrink it)
    AUTORESEARCH_MAX_SEQ_LEN   context length (default from the profile; for tests and sweeps only)
Changing the last three breaks comparability with other runs; every run prints them.
    AUTORESEARCH_RUN_DIR       set by the agent loop: the trainer exports its model there instead of evaluating it

val_bpb is computed like upstream's (summed nats over targets with bytes, over ln 2 x their bytes) but is not upstream's
number for the same model:
- bytes per token are the token's true UTF-8 bytes; upstream counts len(decode([token]).encode()), 3 bytes of U+FFFD
  for a token holding part of a multi-byte character. Upstream's bpb = ours x our bytes / its bytes: 0.99969 on the
  benchmark corpus (cpu profile; 33 of 53,760 targets are such tokens), i.e. -0.0006 at 1.815; more where more of the
  text is non-ASCII (benchmarks/bpb_counting.py measures it for a prepared dataset);
- the evaluation set: EVAL_TOKENS // T packed rows, independent of the batch size, a small validation split used once;
  upstream scores 40 x 524,288 tokens in whole batches of its batch size, looping over a small split;
- packing (pack_rows): the same best-fit rule, but the buffer is topped up one document at a time (upstream: 128 at a
  time), of equally long documents that fit, the one buffered last goes in (upstream: the first), and empty documents
  are dropped (upstream packs each as a lone BOS).
"""

import argparse
import bisect
import glob
import hashlib
import json
import math
import os
import pickle
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------------------
# Constants (fixed, do not modify)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN_UPSTREAM = 2048      # context length of upstream; profiles may use less
TIME_BUDGET_DEFAULT = 300        # training time budget in seconds (5 minutes)
VOCAB_SIZE = 8192                # BPE vocabulary incl. the 4 special tokens
EVAL_TOKENS_UPSTREAM = 10 * 524288  # the Apple port's value (upstream used 40 * 524288)

# Evaluation profiles: everything that must be equal for two val_bpb numbers to be comparable.
# A CPU cannot evaluate 5M tokens of 2048 context in reasonable time, hence the cpu profile.
PROFILES = {
    "gpu":   dict(max_seq_len=2048, eval_tokens=EVAL_TOKENS_UPSTREAM),
    "apple": dict(max_seq_len=2048, eval_tokens=EVAL_TOKENS_UPSTREAM),
    "cpu":   dict(max_seq_len=512, eval_tokens=2**17),
}

DEFAULT_DATASET = "climbmix"
CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"
MAX_SHARD = 6542                 # the last climbmix shard ...
VAL_SHARD = MAX_SHARD            # ... is pinned as the validation shard (for every dataset)
SHARD_NAME = "shard_{:05d}.parquet"
VAL_FILENAME = SHARD_NAME.format(VAL_SHARD)
SHARD_ROWS = 86_016              # documents per shard when we write shards ourselves
ROW_GROUP_ROWS = 1024

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]
TOKENIZER_DOC_CHARS = 10_000     # each document is capped at this many chars for tokenizer training
TOKENIZER_MAX_CHARS = 1_000_000_000

LOCAL_DOC_CHARS = 8_000          # local text files are cut into documents of at most this size
LOCAL_VAL_PERCENT = 2            # share of local documents held out for validation (at least one)


class PrepareError(RuntimeError):
    """A problem with the data the user can fix; printed as one line, never as a traceback."""


def _one_line_excepthook(exc_type, exc, tb, _default=sys.excepthook):
    if getattr(exc_type, "one_line", False):
        print(f"error: {exc}", file=sys.stderr)
        return
    _default(exc_type, exc, tb)


PrepareError.one_line = True
if getattr(sys.excepthook, "__name__", "") != "_one_line_excepthook":
    sys.excepthook = _one_line_excepthook  # any script importing prepare reports PrepareError in one line

# ---------------------------------------------------------------------------
# Paths, dataset and evaluation profile
# ---------------------------------------------------------------------------

CACHE_DIR = os.path.expanduser(os.environ.get("AUTORESEARCH_CACHE_DIR") or "~/.cache/autoresearch")
PROFILE_FILE = os.path.join(CACHE_DIR, "profile.json")
DATASET = os.environ.get("AUTORESEARCH_DATASET") or DEFAULT_DATASET


def _check_dataset_name(name):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise PrepareError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def dataset_dir(name=None):
    return os.path.join(CACHE_DIR, _check_dataset_name(name or DATASET))


def data_dir(name=None):
    return os.path.join(dataset_dir(name), "data")


def tokenizer_dir(name=None):
    return os.path.join(dataset_dir(name), "tokenizer")


def list_datasets():
    """Names of datasets with at least one shard under CACHE_DIR."""
    if not os.path.isdir(CACHE_DIR):
        return []
    return sorted(d for d in os.listdir(CACHE_DIR) if glob.glob(os.path.join(CACHE_DIR, d, "data", "shard_*.parquet")))


@dataclass(frozen=True)
class Profile:
    name: str
    max_seq_len: int
    eval_tokens: int
    source: str          # where the choice came from
    overrides: tuple     # env overrides in force, e.g. ("AUTORESEARCH_EVAL_TOKENS=4096",)

    def describe(self):
        extra = f"; overrides: {', '.join(self.overrides)}" if self.overrides else ""
        return (f"{self.name} (max_seq_len={self.max_seq_len}, eval_tokens={self.eval_tokens:,}; "
                f"{self.source}{extra})")


def hardware_profile_name():
    """The profile this machine's hardware suggests: apple, gpu or cpu."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "apple"
    try:
        import torch
        if torch.cuda.is_available():
            return "gpu"
    except ImportError:
        pass
    return "cpu"


BACKEND_PROFILES = {"cuda": "gpu", "mps": "apple", "cpu": "cpu"}  # mlx: apple on Apple Silicon, cpu elsewhere


def backend_profile_name(backend=None, apple_silicon=None):
    """The profile of the backend that trains (AUTORESEARCH_BACKEND, or the one the hardware picks when it is auto): a
    CPU backend evaluates with the cpu profile also on a machine with a GPU. Read here, not from backends/: the sealed
    evaluator runs this file alone (python -I) and must pick the profile the trainer used."""
    backend = (backend or os.environ.get("AUTORESEARCH_BACKEND") or "auto").strip().lower()
    if apple_silicon is None:
        apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    if backend == "mlx":
        return "apple" if apple_silicon else "cpu"  # MLX's CPU backend on Linux
    return BACKEND_PROFILES.get(backend) or hardware_profile_name()


def _read_profile_record():
    """(name, chosen) from PROFILE_FILE, or None. chosen: recorded by `prepare.py --profile NAME`; a record made from
    the hardware at first prepare is only a note (the backend decides)."""
    if not os.path.exists(PROFILE_FILE):
        return None
    try:
        with open(PROFILE_FILE) as f:
            record = json.load(f)
        name = record["profile"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PrepareError(f"{PROFILE_FILE} is unreadable; delete it and run: uv run prepare.py")
    return _check_profile_name(name, PROFILE_FILE), record.get("chosen") == "--profile"


def _env_int(name):
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = int(float(raw))
    except ValueError:
        raise PrepareError(f"{name}={raw!r} is not a number")
    if value <= 0:
        raise PrepareError(f"{name}={raw!r} must be positive")
    return value


def _check_profile_name(name, origin):
    if name not in PROFILES:
        raise PrepareError(f"unknown evaluation profile {name!r} ({origin}); choose one of: {', '.join(PROFILES)}")
    return name


def get_profile(backend=None, apple_silicon=None):
    """The evaluation profile in force: AUTORESEARCH_PROFILE, else one chosen with `prepare.py --profile`, else the
    profile of the backend that trains (backend_profile_name; backend/apple_silicon: `python -m backends` passes
    what it detected or simulates)."""
    env = os.environ.get("AUTORESEARCH_PROFILE")
    record = None if env else _read_profile_record()
    if env:
        name, source = _check_profile_name(env, "AUTORESEARCH_PROFILE"), "set by AUTORESEARCH_PROFILE"
    elif record and record[1]:
        name, source = record[0], f"chosen with prepare.py --profile, recorded in {PROFILE_FILE}"
    else:
        name = backend_profile_name(backend, apple_silicon)
        forced = (backend or os.environ.get("AUTORESEARCH_BACKEND") or "auto").strip().lower()
        source = f"follows the {forced} backend" if forced != "auto" else "from this machine's hardware"
    values = dict(PROFILES[name])
    overrides = []
    for key, var in (("max_seq_len", "AUTORESEARCH_MAX_SEQ_LEN"), ("eval_tokens", "AUTORESEARCH_EVAL_TOKENS")):
        v = _env_int(var)
        if v is not None:
            values[key] = v
            overrides.append(f"{var}={v}")
    return Profile(name, values["max_seq_len"], values["eval_tokens"], source, tuple(overrides))


def record_profile(name=None):
    """Record the profile next to the data the first time data is prepared (a note of the hardware's), or the one
    chosen with `prepare.py --profile NAME`, which then applies to every run."""
    if name is None and os.path.exists(PROFILE_FILE):
        return
    chosen = {"chosen": "--profile"} if name else {}
    name = _check_profile_name(name or os.environ.get("AUTORESEARCH_PROFILE") or backend_profile_name(), "--profile")
    _atomic_write_bytes(PROFILE_FILE, json.dumps({"profile": name, **PROFILES[name], **chosen}, indent=1).encode())


def _time_budget():
    raw = os.environ.get("AUTORESEARCH_TIME_BUDGET")
    if not raw:
        return TIME_BUDGET_DEFAULT
    try:
        value = float(raw)
    except ValueError:
        raise PrepareError(f"AUTORESEARCH_TIME_BUDGET={raw!r} is not a number of seconds")
    if value <= 0:
        raise PrepareError(f"AUTORESEARCH_TIME_BUDGET={raw!r} must be positive")
    return int(value) if value == int(value) else value


PROFILE = get_profile()
MAX_SEQ_LEN = PROFILE.max_seq_len
EVAL_TOKENS = PROFILE.eval_tokens
TIME_BUDGET = _time_budget()


def describe_setup():
    """One line for the trainers' startup banner: dataset, profile and budget."""
    budget = f"time budget {TIME_BUDGET}s" + (" (AUTORESEARCH_TIME_BUDGET)" if TIME_BUDGET != TIME_BUDGET_DEFAULT else "")
    return f"Dataset: {DATASET} | Profile: {PROFILE.describe()} | {budget}"

# ---------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _publish(tmp, path):
    """Give a finished temp file normal permissions (mkstemp makes it 0600) and move it into place."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def _atomic_write_bytes(path, data):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _publish(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _atomic_save_npy(path, array):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        _publish(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def check_shard(path):
    """Raise PrepareError unless the parquet footer opens and there is a string `text` column."""
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as e:
        raise PrepareError(f"{path} is not a readable parquet file ({type(e).__name__}); delete it and prepare again")
    if "text" not in schema.names or not (pa.types.is_string(schema.field("text").type)
                                          or pa.types.is_large_string(schema.field("text").type)):
        raise PrepareError(f"{path} has no string 'text' column (columns: {', '.join(schema.names)})")


def write_shard(path, texts):
    """Write documents as a climbmix-layout shard (single string column `text`), atomically."""
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
        _publish(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def list_shards(split, name=None):
    """Parquet shards of a split: 'train' = every shard but the pinned val shard, 'val' = the val shard."""
    assert split in ("train", "val"), split
    d = data_dir(name)
    if not os.path.isdir(d):
        known = ", ".join(list_datasets()) or "none"
        hint = ("uv run prepare.py" if (name or DATASET) == DEFAULT_DATASET
                else f"uv run prepare.py --text PATH --name {name or DATASET}  (or convert_dataset.py)")
        raise PrepareError(f"dataset {name or DATASET!r} is not prepared (no {d}; prepared: {known}). Run: {hint}")
    files = sorted(f for f in os.listdir(d) if re.fullmatch(r"shard_\d{5}\.parquet", f))
    if split == "val":
        files = [f for f in files if f == VAL_FILENAME]
        if not files:
            raise PrepareError(f"no validation shard {VAL_FILENAME} in {d}. Run: uv run prepare.py")
    else:
        files = [f for f in files if f != VAL_FILENAME]
        if not files:
            raise PrepareError(f"no training shards in {d} (only the validation shard). "
                               f"Run: uv run prepare.py --num-shards 10")
    return [os.path.join(d, f) for f in files]


def iter_shard_texts(path, batch_rows=ROW_GROUP_ROWS):
    """Yield lists of document strings from a shard, a row group at a time."""
    check_shard(path)
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["text"]):
        yield [t for t in batch.column(0).to_pylist() if t]

# ---------------------------------------------------------------------------
# Download (climbmix, and any dataset laid out as <repo>/resolve/<rev>/<file>)
# ---------------------------------------------------------------------------

def hf_endpoint():
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hf_file_url(repo, filename, revision="main"):
    from urllib.parse import quote
    # a branch such as refs/convert/parquet is one path segment: its slashes must be encoded
    return f"{hf_endpoint()}/datasets/{repo}/resolve/{quote(revision, safe='')}/{filename}"


class DownloadError(PrepareError):
    pass


def download_file(url, dest, *, attempts=5, backoff=1.0, timeout=30, progress=None, verify=check_shard):
    """Download url to dest: resumable (HTTP Range) into dest.part, retried with exponential backoff, verified,
    then renamed. Nothing partial remains on failure. Returns the number of bytes fetched."""
    import requests

    part = dest + ".part"
    fetched = 0
    last_error = "unknown error"
    try:
        for attempt in range(attempts):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            have = os.path.getsize(part) if os.path.exists(part) else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                    if r.status_code == 404:
                        raise DownloadError(f"{url} not found (HTTP 404)")
                    if r.status_code == 416:        # our partial file is already complete (or bogus): start over
                        _remove_quietly(part)
                        last_error = "HTTP 416"
                        continue
                    if r.status_code not in (200, 206):
                        last_error = f"HTTP {r.status_code}"
                        continue
                    mode = "ab" if (have and r.status_code == 206) else "wb"
                    if mode == "wb" and have and progress is not None:
                        progress.update(-have)   # server ignored Range: the earlier bytes are discarded
                    with open(part, mode) as f:
                        for chunk in r.iter_content(chunk_size=1 << 16):
                            f.write(chunk)
                            fetched += len(chunk)
                            if progress is not None:
                                progress.update(len(chunk))
                    expected = r.headers.get("Content-Range", "").rpartition("/")[2] or None
                    if expected and expected.isdigit() and os.path.getsize(part) != int(expected):
                        last_error = f"short body ({os.path.getsize(part)} of {expected} bytes)"
                        continue
            except DownloadError:
                raise
            except requests.RequestException as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            try:
                verify(part)
            except PrepareError as e:
                last_error = f"downloaded file failed verification ({e})"
                if progress is not None:
                    progress.update(-os.path.getsize(part))
                _remove_quietly(part)
                continue
            os.replace(part, dest)
            return fetched
        raise DownloadError(f"could not download {url} after {attempts} attempts: {last_error}")
    finally:
        _remove_quietly(part)


def download_shards(indices, dest_dir, *, repo=CLIMBMIX_REPO, workers=8, attempts=5, backoff=1.0, timeout=30):
    """Download climbmix-layout shards (shard_%05d.parquet) of a dataset repo into dest_dir."""
    jobs = [(hf_file_url(repo, SHARD_NAME.format(i)), os.path.join(dest_dir, SHARD_NAME.format(i))) for i in indices]
    download_files(jobs, workers=workers, attempts=attempts, backoff=backoff, timeout=timeout,
                   what=f"shard(s) of {repo}")


def check_parquet(path):
    """Raise PrepareError unless the parquet footer opens (any columns)."""
    try:
        pq.ParquetFile(path)
    except Exception as e:
        raise PrepareError(f"{path} is not a readable parquet file ({type(e).__name__}); delete it and try again")


def download_files(jobs, *, workers=8, attempts=5, backoff=1.0, timeout=30, verify=check_shard, what="file(s)"):
    """Download (url, dest) pairs in parallel with one progress bar, skipping destinations that already verify.
    Each file is resumable, retried, verified and renamed into place (see download_file); raises DownloadError
    with one line (the offline advice when the endpoint cannot be reached)."""
    from tqdm import tqdm

    todo = []
    for url, dest in jobs:
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        if os.path.exists(dest):
            try:
                verify(dest)
                continue
            except PrepareError:
                os.remove(dest)   # corrupt leftover from an older tool: fetch it again
        todo.append((url, dest))
    if not todo:
        print(f"All {len(jobs)} {what} already present")
        return
    _check_reachable(todo[0][0])
    print(f"Downloading {len(todo)} {what} from {hf_endpoint()} with {workers} workers")
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=f"files 0/{len(todo)}",
               disable=None, dynamic_ncols=True)
    done, errors = 0, []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(download_file, url, dest, attempts=attempts, backoff=backoff, timeout=timeout,
                               progress=_GrowingBar(bar), verify=verify) for url, dest in todo]
        for fut in as_completed(futures):
            try:
                fut.result()
                done += 1
                bar.set_description(f"files {done}/{len(todo)}")
            except PrepareError as e:
                errors.append(str(e))
    bar.close()
    if errors:
        offline = all(("ConnectionError" in e or "Timeout" in e) for e in errors)
        if offline:
            raise _offline_error(f"{len(errors)} download(s) failed")
        raise DownloadError(f"{len(errors)} of {len(todo)} download(s) failed; first: {errors[0]}")
    print(f"Downloaded {done} {what} into {os.path.dirname(todo[0][1])}")


def _offline_error(detail):
    return DownloadError(f"cannot reach {hf_endpoint()} ({detail}). Set HF_ENDPOINT to a reachable mirror, "
                         f"or prepare offline from local files: uv run prepare.py --text PATH")


def _check_reachable(url):
    """Fail in a second, with the offline advice, when the endpoint cannot be reached at all."""
    import requests
    try:
        requests.head(url, timeout=10, allow_redirects=True)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _offline_error(type(e).__name__)


class _GrowingBar:
    """A byte-progress adapter that grows the bar's total as bytes arrive (sizes are unknown up front)."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n):
        if n > 0:
            self.bar.total = (self.bar.total or 0) + n
        else:
            self.bar.total = max(0, (self.bar.total or 0) + n)
        self.bar.update(n)

# ---------------------------------------------------------------------------
# Local text import (offline / private data)
# ---------------------------------------------------------------------------

LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def _expand_inputs(paths):
    files = []
    for p in paths:
        matches = sorted(glob.glob(os.path.expanduser(p), recursive=True)) if any(c in p for c in "*?[") else [p]
        if not matches:
            raise PrepareError(f"no files match {p!r}")
        for m in matches:
            m = os.path.expanduser(m)
            if os.path.isdir(m):
                for root, _, names in sorted(os.walk(m)):
                    files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(LOCAL_SUFFIXES)]
            elif os.path.isfile(m):
                if not m.lower().endswith(LOCAL_SUFFIXES):
                    raise PrepareError(f"{m}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
                files.append(m)
            else:
                raise PrepareError(f"{m}: no such file or directory")
    return files


def _split_text(text, max_chars=LOCAL_DOC_CHARS):
    """Cut a long text into documents at paragraph boundaries (hard cut only for giant paragraphs)."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    docs, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        while len(para) > max_chars:
            if cur:
                docs.append(cur)
                cur = ""
            docs.append(para[:max_chars])
            para = para[max_chars:]
        if cur and len(cur) + 2 + len(para) > max_chars:
            docs.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur.strip():
        docs.append(cur)
    return [d for d in (d.strip() for d in docs) if d]


def read_local_documents(path):
    """Documents from one local file, plus a list of warnings (bad bytes, skipped lines)."""
    warnings = []
    low = path.lower()
    try:
        if low.endswith(".parquet"):
            try:
                table = pq.read_table(path)
            except Exception as e:
                raise PrepareError(f"{path}: not a readable parquet file ({type(e).__name__})")
            if "text" not in table.column_names:
                raise PrepareError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
            return [t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip()], warnings
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e.strerror})")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad:
        warnings.append(f"{path}: {bad} invalid UTF-8 byte sequence(s) replaced with U+FFFD")
    if low.endswith(".jsonl"):
        docs, skipped = [], 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            t = obj.get("text") if isinstance(obj, dict) else None
            if isinstance(t, str) and t.strip():
                docs.append(t)
            else:
                skipped += 1
        if skipped:
            warnings.append(f"{path}: skipped {skipped} line(s) that are not JSON objects with a non-empty 'text'")
        return docs, warnings
    return _split_text(text), warnings


def import_local_text(paths, name="local"):
    """Import local files into the standard shard layout of dataset `name` (replacing its shards)."""
    _check_dataset_name(name)
    files = _expand_inputs(paths)
    if not files:
        raise PrepareError(f"no {', '.join(LOCAL_SUFFIXES)} files found in: {' '.join(paths)}")
    docs, empty = [], []
    for path in files:
        file_docs, warnings = read_local_documents(path)
        for w in warnings:
            print(f"warning: {w}")
        if not file_docs:
            empty.append(path)
        docs += file_docs
    for path in empty:
        print(f"warning: {path}: empty, skipped")
    if len(docs) < 2:
        raise PrepareError(f"found {len(docs)} non-empty document(s) in {len(files)} file(s); "
                           f"need at least 2 (one is held out for validation)")
    # Deterministic held-out split: by a hash of each document's text, so adding files moves few documents.
    keyed = sorted(((hashlib.sha256(d.encode()).digest(), d) for d in docs), key=lambda kd: kd[0])
    n_val = max(1, len(docs) * LOCAL_VAL_PERCENT // 100)
    val = [d for _, d in keyed[:n_val]]
    train = [d for _, d in keyed[n_val:]]
    d = data_dir(name)
    os.makedirs(d, exist_ok=True)
    for old in glob.glob(os.path.join(d, "shard_*.parquet")):
        os.remove(old)
    n_shards = math.ceil(len(train) / SHARD_ROWS)
    for i in range(n_shards):
        write_shard(os.path.join(d, SHARD_NAME.format(i)), train[i * SHARD_ROWS:(i + 1) * SHARD_ROWS])
    write_shard(os.path.join(d, VAL_FILENAME), val)
    fingerprint = hashlib.sha256("\0".join(docs).encode()).hexdigest()
    manifest = dict(name=name, source="local", files=len(files), documents=len(docs), train_documents=len(train),
                    val_documents=len(val), train_shards=n_shards, text_sha256=fingerprint)
    _atomic_write_bytes(os.path.join(dataset_dir(name), "source.json"), json.dumps(manifest, indent=1).encode())
    print(f"Imported {len(docs):,} documents from {len(files)} file(s) into {d}: "
          f"{n_shards} train shard(s), {len(val)} validation document(s)")
    return manifest

# ---------------------------------------------------------------------------
# Tokenizer: rustbpe training, exported as a pickled tiktoken Encoding
# ---------------------------------------------------------------------------

def _tokenizer_text_iterator(name):
    chars = 0
    for path in list_shards("train", name):
        for texts in iter_shard_texts(path):
            for t in texts:
                t = t[:TOKENIZER_DOC_CHARS]
                chars += len(t)
                yield t
                if chars >= TOKENIZER_MAX_CHARS:
                    return


def train_tokenizer(name=None):
    import rustbpe
    import tiktoken

    out = tokenizer_dir(name)
    t0 = time.time()
    print(f"Training a {VOCAB_SIZE}-token BPE tokenizer on the training shards of {name or DATASET!r} ...", flush=True)
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_tokenizer_text_iterator(name), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    special = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=ranks, special_tokens=special)
    token_bytes = np.array([0 if i in special.values() else len(enc.decode_single_token_bytes(i))
                            for i in range(enc.n_vocab)], dtype=np.int32)
    # Round-trip sanity check before anything is written.
    sample = "Hello world! Numbers 12345, unicode: café — 你好 🚀\n\ttabs and  spaces."
    if enc.decode(enc.encode_ordinary(sample)) != sample:
        raise PrepareError("tokenizer round-trip check failed")
    if os.path.isdir(os.path.join(out, "tokens")):
        import shutil
        shutil.rmtree(os.path.join(out, "tokens"))   # token cache belongs to the old tokenizer
    _atomic_write_bytes(os.path.join(out, "tokenizer.pkl"), pickle.dumps(enc))
    _atomic_save_npy(os.path.join(out, "token_bytes.npy"), token_bytes)
    print(f"Tokenizer: {enc.n_vocab} tokens, trained in {time.time() - t0:.1f}s, saved to {out}")
    return enc


class Tokenizer:
    """A pickled tiktoken Encoding with the BOS special token (upstream's interface)."""

    def __init__(self, enc, directory=None):
        self.enc = enc
        self.directory = directory
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, directory=None):
        directory = directory or tokenizer_dir()
        path = os.path.join(directory, "tokenizer.pkl")
        if not os.path.exists(path):
            raise PrepareError(f"no tokenizer at {path}. Run: uv run prepare.py"
                               + ("" if DATASET == DEFAULT_DATASET else f"  (with AUTORESEARCH_DATASET={DATASET})"))
        try:
            with open(path, "rb") as f:
                enc = pickle.load(f)
        except Exception as e:
            raise PrepareError(f"{path} is unreadable ({type(e).__name__}); retrain it: uv run prepare.py")
        return cls(enc, directory)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        prefix = [] if prepend is None else [prepend if isinstance(prepend, int) else self.enc.encode_single_token(prepend)]
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text)
        return [prefix + ids for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(tokenizer=None):
    """Bytes per token id (0 for special tokens) as a numpy int32 array."""
    directory = tokenizer.directory if tokenizer is not None and tokenizer.directory else tokenizer_dir()
    path = os.path.join(directory, "token_bytes.npy")
    if not os.path.exists(path):
        raise PrepareError(f"no {path}. Run: uv run prepare.py")
    return np.load(path)

# ---------------------------------------------------------------------------
# Token cache: every shard tokenized once (uint16 ids, BOS before each document)
# ---------------------------------------------------------------------------

def _token_cache_paths(tokenizer, shard_path):
    base = os.path.join(tokenizer.directory, "tokens", os.path.basename(shard_path)[:-len(".parquet")])
    return base + ".tok.npy", base + ".idx.npy", base + ".json"


def _shard_signature(path):
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tokenize_shard(tokenizer, shard_path, num_threads=None):
    """Tokenize a shard into the cache (atomic) unless an up-to-date copy exists. Returns (tokens, offsets)."""
    tok_path, idx_path, meta_path = _token_cache_paths(tokenizer, shard_path)
    sig = _shard_signature(shard_path)
    try:
        with open(meta_path) as f:
            fresh = json.load(f) == sig
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        os.makedirs(os.path.dirname(tok_path), exist_ok=True)
        bos = tokenizer.get_bos_token_id()
        pieces, lengths = [], []
        for texts in iter_shard_texts(shard_path):
            for ids in tokenizer.enc.encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count() or 1):
                pieces.append(np.asarray([bos] + ids, dtype=np.uint16))
                lengths.append(len(ids) + 1)
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        _atomic_save_npy(tok_path, tokens)
        _atomic_save_npy(idx_path, offsets)
        _atomic_write_bytes(meta_path, json.dumps(sig).encode())
    return np.load(tok_path, mmap_mode="r"), np.load(idx_path)


def tokenize_dataset(tokenizer, name=None):
    from tqdm import tqdm

    shards = list_shards("train", name) + list_shards("val", name)
    total = 0
    for path in tqdm(shards, desc="Tokenizing shards", unit="shard", disable=None, dynamic_ncols=True):
        tokens, _ = tokenize_shard(tokenizer, path)
        total += len(tokens)
    print(f"Token cache: {total:,} tokens in {len(shards)} shard(s)")

# ---------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing (upstream), one numpy core + thin torch / MLX adapters
# ---------------------------------------------------------------------------

def _iter_documents(tokenizer, split, loop=True):
    """Yield (token array of one document, epoch) in shard order; wraps around (epoch + 1) when loop=True."""
    shards = list_shards(split)
    epoch = 1
    while True:
        n = 0
        for path in shards:
            tokens, offsets = tokenize_shard(tokenizer, path)
            starts, ends = offsets[:-1].tolist(), offsets[1:].tolist()
            for s, e in zip(starts, ends):
                yield tokens[s:e], epoch
            n += len(starts)
        if n == 0:
            raise PrepareError(f"the {split} split of {DATASET!r} has no documents. Run: uv run prepare.py")
        if not loop:
            return
        epoch += 1


def pack_rows(docs, row_len, buffer_size=1000):
    """Best-fit packing: each row starts with a document's BOS; the largest buffered document that fits goes in next;
    when none fits, the shortest one is cropped to fill the row exactly. No padding. Yields (row, epoch), epoch being
    the newest epoch of any document placed so far. The row sequence does not depend on the batch size, so evaluation is
    the same for every DEVICE_BATCH_SIZE."""
    lens, buf = [], []          # buffered (document, epoch), sorted by document length
    exhausted, last_epoch = False, 1
    while True:
        row = np.empty(row_len, dtype=np.int64)
        pos, row_epoch = 0, 0
        while pos < row_len:
            while not exhausted and len(buf) < buffer_size:
                try:
                    doc, epoch = next(docs)
                except StopIteration:
                    exhausted = True
                    break
                k = bisect.bisect_right(lens, len(doc))
                lens.insert(k, len(doc))
                buf.insert(k, (doc, epoch))
            if not buf:
                return          # finite stream used up: the partial row is dropped
            remaining = row_len - pos
            k = bisect.bisect_right(lens, remaining) - 1
            if k >= 0:
                lens.pop(k)
                doc, epoch = buf.pop(k)
                row[pos:pos + len(doc)] = doc
                pos += len(doc)
            else:
                lens.pop(0)
                doc, epoch = buf.pop(0)
                row[pos:] = doc[:remaining]
                pos = row_len
            row_epoch = max(row_epoch, epoch)
        last_epoch = max(last_epoch, row_epoch)   # best-fit can still place an older document later
        yield row, last_epoch


def iter_batches(tokenizer, B, T, split, buffer_size=1000):
    """The backend-neutral core: endless (int64 array of shape (B, T+1), epoch)."""
    n_docs = sum(len(tokenize_shard(tokenizer, path)[1]) - 1 for path in list_shards(split))
    # A split smaller than the buffer would be pulled in several times over before the first row.
    rows = pack_rows(_iter_documents(tokenizer, split), T + 1, max(1, min(buffer_size, n_docs)))
    while True:
        batch = np.empty((B, T + 1), dtype=np.int64)
        for i in range(B):
            batch[i], epoch = next(rows)
        yield batch, epoch


def make_dataloader(tokenizer, B, T, split, buffer_size=1000, device="cpu"):
    """Yield (inputs, targets, epoch) forever. device: a torch device ("cpu", "cuda", "mps", ...) or "mlx"."""
    batches = iter_batches(tokenizer, B, T, split, buffer_size)
    if str(device) == "mlx":
        import mlx.core as mx
        for batch, epoch in batches:
            b = mx.array(batch.astype(np.int32))
            yield b[:, :-1], b[:, 1:], epoch
        return
    import torch
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    for batch, epoch in batches:
        b = torch.from_numpy(batch)
        if on_cuda:
            b = b.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            b = b.to(device)
        yield b[:, :-1], b[:, 1:], epoch

# ---------------------------------------------------------------------------
# Evaluation: bits per byte (fixed metric, do not modify)
# ---------------------------------------------------------------------------

_eval_rows_cache = {}


def eval_rows(tokenizer, T):
    """The fixed evaluation set: the first EVAL_TOKENS // T packed rows of the validation split, in one pass
    (a validation split smaller than that is used whole, never repeated)."""
    key = (tokenizer.directory, T, EVAL_TOKENS)
    if key not in _eval_rows_cache:
        want = max(1, EVAL_TOKENS // T)
        rows = []
        for row, _ in pack_rows(_iter_documents(tokenizer, "val", loop=False), T + 1):
            rows.append(row)
            if len(rows) == want:
                break
        if not rows:
            raise PrepareError(f"the validation split of {DATASET!r} is shorter than one row of {T + 1} tokens")
        if len(rows) < want:
            print(f"note: the validation split has only {len(rows) * T:,} tokens at T={T}; evaluating on all of it "
                  f"(EVAL_TOKENS={EVAL_TOKENS:,})", flush=True)
        _eval_rows_cache[key] = np.stack(rows)
    return _eval_rows_cache[key]


LOGITS_BUDGET_BYTES = 1 << 29    # fp32 logits per forward during evaluation stay under 512 MiB


def evaluate_bpb(model, tokenizer, batch_size, seq_len=None):
    """Bits per byte on the fixed evaluation set: sum of per-token nats over targets with byte length > 0,
    divided by ln 2 x their bytes. Works for torch and MLX models whose forward is model(x, y, reduction='none')
    -> per-token losses in nats of shape (B, T)."""
    T = seq_len or MAX_SEQ_LEN
    rows = eval_rows(tokenizer, T)
    token_bytes = get_token_bytes(tokenizer)
    vocab = len(token_bytes)
    chunk = max(1, min(batch_size, LOGITS_BUDGET_BYTES // (T * vocab * 4)))
    nbytes_all = token_bytes[rows[:, 1:]]
    total_bytes = int(nbytes_all.sum())
    if total_bytes == 0:
        raise PrepareError("the evaluation set has no bytes (only special tokens)")
    mlx_nn = sys.modules.get("mlx.nn")  # an MLX model means mlx is loaded; never import it for a torch model
    is_mlx = mlx_nn is not None and isinstance(model, mlx_nn.Module)
    total_nats = 0.0
    if is_mlx:
        import mlx.core as mx
        for i in range(0, len(rows), chunk):
            b = mx.array(rows[i:i + chunk].astype(np.int32))
            mask = mx.array(nbytes_all[i:i + chunk] > 0)
            loss = model(b[:, :-1], b[:, 1:], reduction="none").astype(mx.float32)
            s = mx.sum(mx.where(mask, loss, 0.0))
            total_nats += float(s.item())
    else:
        import torch
        device = next(model.parameters()).device
        with torch.no_grad():
            for i in range(0, len(rows), chunk):
                b = torch.from_numpy(rows[i:i + chunk]).to(device)
                mask = torch.from_numpy(nbytes_all[i:i + chunk] > 0).to(device)
                loss = model(b[:, :-1], b[:, 1:], reduction="none").float()
                total_nats += float((loss * mask).sum().item())
    return total_nats / (math.log(2) * total_bytes)

# ---------------------------------------------------------------------------
# Summary: the block after `---` that tui/parser.py and the agent read (fixed format, do not modify)
# ---------------------------------------------------------------------------

# Keys in print order and the number format of each; values start at column 18
SUMMARY_FORMATS = {"val_bpb": ".6f", "training_seconds": ".1f", "total_seconds": ".1f", "peak_vram_mb": ".1f",
                   "mfu_percent": ".2f", "total_tokens_M": ".1f", "num_steps": "", "num_params_M": ".1f",
                   "depth": "", "backend": "", "chip": ""}


def print_summary(**fields):
    """Print the end-of-run summary: `---`, then one `key: value` line for each of SUMMARY_FORMATS (all required,
    in that order), then any further fields as given (e.g. an energy reading; the parser keeps them as extras).
    val_bpb=None (the model was exported for the sealed evaluation, which reports val_bpb) leaves its line out."""
    missing = [key for key in SUMMARY_FORMATS if key not in fields]
    if missing:
        raise TypeError(f"print_summary() is missing {', '.join(missing)}")
    print("---")
    for key, value in {**dict.fromkeys(SUMMARY_FORMATS), **fields}.items():
        if not (key == "val_bpb" and value is None):
            print(f"{key + ':':<17} {value:{SUMMARY_FORMATS.get(key, '')}}")


# ---------------------------------------------------------------------------
# Sealed evaluation: the trainer exports its model, a separate process scores it (fixed code, do not modify)
# ---------------------------------------------------------------------------
# When the agent loop runs a trainer it sets AUTORESEARCH_RUN_DIR. The trainer then does not evaluate itself:
# export_model() saves the trained model as a program mapping input ids (B, T) to logits (B, T, vocab), and the engine
# runs `python -I -B prepare.py --evaluate RUN_DIR`, which feeds that program the evaluation inputs and computes bits
# per byte from the logits itself. The program never sees a target, no code the agent wrote runs, and val_bpb is never
# read from what the trainer prints. torch.export.load alone would run pickles, Python guard code and any torch.*
# callable named in the file, so a .pt2 is checked against a strict schema and rebuilt before torch reads it.

RUN_DIR = os.environ.get("AUTORESEARCH_RUN_DIR") or None
EXPORT_META = "export.json"
EXPORT_FILES = {"torch.export": "model.pt2", "mlx.export_function": "model.mlxfn"}
CAUSAL_TOLERANCE = 1e-4  # relative: logits before a changed token may move by rounding only


class ExportError(PrepareError):
    """The exported model cannot be scored: missing, malformed, or doing what a model must not."""


def _is_mlx_model(model):
    mlx_nn = sys.modules.get("mlx.nn")  # an MLX model means mlx is loaded; never import it for a torch model
    return mlx_nn is not None and isinstance(model, mlx_nn.Module)


def _export_batch(batch_size, T, vocab):
    """The evaluation batch: evaluate_bpb's chunk (fp32 logits under LOGITS_BUDGET_BYTES)."""
    return max(1, min(batch_size, LOGITS_BUDGET_BYTES // (T * vocab * 4)))


def export_model(model, tokenizer, batch_size, run_dir=None):
    """Save the trained model for the sealed evaluation and return what export.json says. The program is model(idx)
    (forward without targets: logits) for idx of shape (B, MAX_SEQ_LEN), B the batch evaluate_bpb would use.
    PyTorch: torch.export.export, saved with its weights (torch.export.save) as run_dir/model.pt2; MLX:
    mx.export_function as run_dir/model.mlxfn. export.json is written last, so its presence means a whole export."""
    run_dir = run_dir or RUN_DIR
    if not run_dir:
        raise PrepareError("export_model needs a run directory: AUTORESEARCH_RUN_DIR (the agent loop sets it) "
                           "or run_dir=")
    t0 = time.time()
    T, vocab = MAX_SEQ_LEN, len(get_token_bytes(tokenizer))
    B = _export_batch(batch_size, T, vocab)
    os.makedirs(run_dir, exist_ok=True)
    fmt = "mlx.export_function" if _is_mlx_model(model) else "torch.export"
    path = os.path.join(run_dir, EXPORT_FILES[fmt])
    _remove_quietly(path)
    if fmt == "mlx.export_function":
        import mlx.core as mx
        mx.export_function(path, lambda idx: model(idx), mx.zeros((B, T), dtype=mx.int32))
    else:
        import torch
        module = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: export traces the module itself
        example = torch.zeros((B, T), dtype=torch.long, device=next(module.parameters()).device)
        torch.export.save(torch.export.export(module, (example,)), path)
    meta = {"format": fmt, "file": EXPORT_FILES[fmt], "batch": B, "seq_len": T, "vocab": vocab}
    _atomic_write_bytes(os.path.join(run_dir, EXPORT_META), json.dumps(meta).encode())
    print(f"Exported the model for the sealed evaluation: {fmt}, ({B}, {T}) -> ({B}, {T}, {vocab}), "
          f"{os.path.getsize(path) / 2**20:.1f} MiB in {time.time() - t0:.1f}s", flush=True)
    return meta


def _read_export_meta(run_dir, T, vocab):
    path = os.path.join(run_dir, EXPORT_META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ExportError(f"no {EXPORT_META} in {run_dir}: the trainer exported no model (keep the "
                          f"prepare.export_model(...) call at the end of the training script)")
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable ({type(e).__name__}): export with prepare.export_model(...)")
    if not isinstance(meta, dict) or meta.get("format") not in EXPORT_FILES:
        raise ExportError(f"{path}: unknown export format; export with prepare.export_model(...)")
    B, most = meta.get("batch"), _export_batch(1 << 62, T, vocab)
    if meta.get("seq_len") != T or meta.get("vocab") != vocab:
        raise ExportError(f"the export takes {meta.get('seq_len')} tokens over a vocabulary of {meta.get('vocab')}; "
                          f"the evaluation needs MAX_SEQ_LEN={T} and {vocab}: export with prepare.export_model(...)")
    if type(B) is not int or not 1 <= B <= most:
        raise ExportError(f"the export's batch {B!r} is not between 1 and {most}: export with "
                          f"prepare.export_model(...)")
    return meta


# -- a torch.export program, checked before torch reads it ---------------------------------------------------------

_PT2_WEIGHT = re.compile(r"data/(weights/weight|constants/tensor)_\d+")
_PT2_CONFIGS = {"data/weights/model_weights_config.json", "data/constants/model_constants_config.json"}
_PT2_SKIPPED = {"archive_format", "archive_version", ".data/version", ".data/serialization_id"}  # the writer's own
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_WORD = re.compile(r"[A-Za-z0-9_.:-]{0,64}")
_DEVICES = ("cpu", "cuda", "mps")
_DENIED_OPS = {"from_file", "_print"}  # reach outside the tensors they get: a file, the output stream
_SCALAR_ARGS = {"as_int": int, "as_scalar_type": int, "as_memory_format": int, "as_layout": int, "as_bool": bool}


def _pt2_fail(what):
    raise ExportError(f"the exported program {what}; the sealed evaluation runs plain ATen programs written by "
                      f"prepare.export_model(...) (torch.export of forward(idx) -> logits)")


def _pt2_ints(values, what):
    if not isinstance(values, list) or any(set(v) != {"as_int"} or type(v["as_int"]) is not int for v in values):
        _pt2_fail(f"has a symbolic or malformed {what}")


def _pt2_tensor_meta(meta):
    if not isinstance(meta, dict) or not set(meta) <= {"dtype", "sizes", "requires_grad", "device", "strides",
                                                        "storage_offset", "layout"}:
        _pt2_fail("has a malformed tensor description")
    _pt2_ints(meta.get("sizes"), "shape")
    _pt2_ints(meta.get("strides"), "stride")
    _pt2_ints([meta.get("storage_offset")], "storage offset")
    device = meta.get("device")
    if not isinstance(device, dict) or device.get("type") not in _DEVICES:
        _pt2_fail(f"uses a device other than {', '.join(_DEVICES)}")


def _pt2_name(value):
    if not isinstance(value, dict) or set(value) != {"name"} or not _IDENT.fullmatch(str(value["name"])):
        _pt2_fail("has a malformed value name")


def _pt2_arg(arg):
    """One argument of one node: tensors by name, or plain constants; nothing that names code or a symbol."""
    if not isinstance(arg, dict) or len(arg) != 1:
        _pt2_fail("has a malformed argument")
    (kind, value), = arg.items()
    if kind == "as_tensor":
        _pt2_name(value)
    elif kind == "as_tensors" and isinstance(value, list):
        for v in value:
            _pt2_name(v)
    elif kind == "as_optional_tensors" and isinstance(value, list):
        for v in value:
            if not isinstance(v, dict) or set(v) not in ({"as_tensor"}, {"as_none"}):
                _pt2_fail("has a malformed optional tensor")
            _pt2_arg(v)
    elif kind in _SCALAR_ARGS:
        if type(value) is not _SCALAR_ARGS[kind]:
            _pt2_fail(f"has a malformed {kind} argument")
    elif kind in ("as_ints", "as_bools") and isinstance(value, list):
        if any(type(v) is not (int if kind == "as_ints" else bool) for v in value):
            _pt2_fail(f"has a malformed {kind} argument")
    elif kind == "as_float":
        if type(value) not in (int, float) and value not in ("inf", "-inf", "nan"):
            _pt2_fail("has a malformed float argument")
    elif kind == "as_floats" and isinstance(value, list):
        for v in value:
            _pt2_arg({"as_float": v})
    elif kind == "as_none":
        pass
    elif kind == "as_string" and isinstance(value, str) and _WORD.fullmatch(value):
        pass
    elif kind == "as_device" and isinstance(value, dict) and value.get("type") in _DEVICES:
        pass
    else:
        _pt2_fail(f"passes a {kind} argument")


def _pt2_node(node, torch):
    if not isinstance(node, dict) or not set(node) <= {"target", "inputs", "outputs", "metadata", "name",
                                                        "is_hop_single_tensor_return"}:
        _pt2_fail("has a malformed node")
    target = str(node.get("target"))
    m = _ATEN_TARGET.fullmatch(target)
    if target != "_operator.getitem":
        if not m:
            _pt2_fail(f"calls {target[:80]} (only ATen operators are allowed)")
        op, overload = m.groups()
        packet = getattr(torch.ops.aten, op, None) if op not in _DENIED_OPS else None
        schema = getattr(getattr(packet, overload, None), "_schema", None)
        if schema is None:
            _pt2_fail(f"calls aten.{op}.{overload}, which this evaluator does not run")
        if schema.is_mutable:
            _pt2_fail(f"calls the in-place operator aten.{op}.{overload} (a program with state could tell the "
                      f"evaluation's calls apart): write x = x + y, not x += y, in forward")
    for arg in node.get("inputs", []):
        if not isinstance(arg, dict) or not isinstance(arg.get("name"), str):
            _pt2_fail("has a malformed node input")
        _pt2_arg(arg.get("arg"))
    for out in node.get("outputs", []):
        _pt2_arg(out)
    node["metadata"] = {}  # stack traces and module paths: text that FX would paste into the code it generates


def _pt2_program(program, torch, B, T):
    """Check the serialized ExportedProgram and return it rebuilt from what was checked."""
    if not isinstance(program, dict) or not set(program) <= {"graph_module", "opset_version", "range_constraints",
                                                              "schema_version", "verifiers", "torch_version",
                                                              "guards_code"}:
        _pt2_fail("has unknown top-level fields")
    if program.get("guards_code") or program.get("range_constraints"):
        _pt2_fail("has guard code or symbolic shapes (export with static shapes)")
    if not all(isinstance(v, str) and _IDENT.fullmatch(v) for v in program.get("verifiers", [])):
        _pt2_fail("names a strange verifier")
    gm = program.get("graph_module")
    if (not isinstance(gm, dict) or gm.get("treespec_namedtuple_fields")
            or not set(gm) <= {"graph", "signature", "module_call_graph", "metadata", "treespec_namedtuple_fields"}):
        _pt2_fail("has a malformed graph module")
    graph = gm.get("graph")
    if not isinstance(graph, dict) or any(graph.get(k) for k in ("sym_int_values", "sym_bool_values",
                                                                  "sym_float_values", "custom_obj_values")):
        _pt2_fail("has symbolic values or custom objects")
    for name, meta in graph.get("tensor_values", {}).items():
        _pt2_name({"name": name})
        _pt2_tensor_meta(meta)
    for node in graph.get("nodes", []):
        _pt2_node(node, torch)
    for value in graph.get("inputs", []) + graph.get("outputs", []):
        _pt2_arg(value)
    if len(graph.get("outputs", [])) != 1 or "as_tensor" not in graph["outputs"][0]:
        _pt2_fail("does not return exactly one tensor (the logits)")
    signature = gm.get("signature") or {}
    kinds = {"parameter": "parameter_name", "buffer": "buffer_name", "tensor_constant": "tensor_constant_name"}
    users = []
    for spec in signature.get("input_specs", []):
        if not isinstance(spec, dict) or len(spec) != 1:
            _pt2_fail("has a malformed input")
        (kind, value), = spec.items()
        if kind == "user_input":
            _pt2_arg(value.get("arg"))
            users.append(value)
        elif kind in kinds and _FQN.fullmatch(str(value.get(kinds[kind]))):
            _pt2_name(value.get("arg"))
        else:
            _pt2_fail(f"has an input of kind {kind}")
    outputs = signature.get("output_specs", [])
    if len(users) != 1 or len(outputs) != 1 or set(outputs[0]) != {"user_output"}:
        _pt2_fail("does not map one input (the token ids) to one output (the logits): no state, no mutated buffers")
    shape = [v["as_int"] for v in graph["tensor_values"].get(users[0]["arg"].get("as_tensor", {}).get("name"), {})
             .get("sizes", [])]
    if shape != [B, T]:
        _pt2_fail(f"takes input ids of shape {tuple(shape)}, not ({B}, {T})")
    from torch.utils import _pytree as pytree
    example = torch.zeros((B, T), dtype=torch.long)
    gm["metadata"] = {}
    gm["module_call_graph"] = [{"fqn": "", "signature": {  # the calling convention of forward(idx), restated by us
        "inputs": [], "outputs": [], "in_spec": pytree.treespec_dumps(pytree.tree_structure(((example,), {}))),
        "out_spec": pytree.treespec_dumps(pytree.tree_structure(example)), "forward_arg_names": ["idx"]}}]
    return program, example


def _pt2_payload_config(text):
    config = json.loads(text)
    if not isinstance(config, dict) or set(config) != {"config"}:
        _pt2_fail("has a malformed weights description")
    for fqn, payload in config.get("config", {}).items():
        if (not _FQN.fullmatch(fqn) or not set(payload) <= {"path_name", "is_param", "use_pickle", "tensor_meta"}
                or payload.get("use_pickle") is not False
                or not re.fullmatch(r"(weight|tensor)_\d+", str(payload.get("path_name")))):
            _pt2_fail("stores a weight as a pickle or under a strange name")
        _pt2_tensor_meta(payload.get("tensor_meta"))
    return text


def _load_torch_program(path, B, T):
    """The export's module, loaded only after every record of the archive was checked and the archive rebuilt from
    the checked records (tensor bytes, the graph without its free text, our own example input)."""
    import io
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # every torch.load in the loader: tensors only, no code
    import torch
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter
    try:
        reader = PT2ArchiveReader(path)
        names = reader.get_file_names()
    except Exception as e:
        raise _export_failure(f"{path} is not a torch.export archive", e)
    if "models/model.json" not in names:
        _pt2_fail("has no models/model.json")
    buffer = io.BytesIO()
    with PT2ArchiveWriter(buffer) as writer:
        for name in names:
            if name in _PT2_SKIPPED:
                continue
            if name == "models/model.json":
                program, example = _pt2_program(json.loads(reader.read_string(name)), torch, B, T)
                writer.write_string(name, json.dumps(program))
            elif name == "data/sample_inputs/model.pt":
                sample = io.BytesIO()
                torch.save(((example,), {}), sample)
                writer.write_bytes(name, sample.getvalue())
            elif name in _PT2_CONFIGS:
                writer.write_string(name, _pt2_payload_config(reader.read_string(name)))
            elif _PT2_WEIGHT.fullmatch(name) or (name == "byteorder" and reader.read_string(name) in ("little", "big")):
                writer.write_bytes(name, reader.read_bytes(name))
            else:
                _pt2_fail(f"holds {name[:80]} (compiled code, pickles or extra files)")
    buffer.seek(0)
    program = torch.export.load(buffer)
    import operator
    for node in program.graph.nodes:  # what torch made of the names: only ATen operators and tuple indexing
        if node.op == "call_function" and node.target is not operator.getitem and not (
                isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "aten"):
            _pt2_fail(f"calls {str(node.target)[:80]}")
        elif node.op not in ("placeholder", "call_function", "output"):
            _pt2_fail(f"has a {node.op} node")
    return program.module()


class _TorchProgram:
    def __init__(self, path, B, T):
        import torch
        self.torch = torch
        self.module = _load_torch_program(path, B, T)
        devices = {t.device for t in list(self.module.parameters()) + list(self.module.buffers())}
        if len(devices) > 1:
            _pt2_fail("keeps its weights on more than one device")
        self.device = devices.pop() if devices else torch.device("cpu")
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # as train.py does on CUDA: TF32 matmuls

    def forward(self, x):
        with self.torch.no_grad():
            return self.module(self.torch.from_numpy(x).to(self.device))

    def nats(self, logits, y, mask):
        """Sum of the per-token cross-entropy (nats) of the first len(mask) rows where mask is true."""
        F = self.torch.nn.functional
        n, T = mask.shape
        targets = self.torch.from_numpy(y[:n]).to(self.device).reshape(-1)
        loss = F.cross_entropy(logits[:n].float().reshape(n * T, -1), targets, reduction="none").view(n, T)
        return float((loss * self.torch.from_numpy(mask).to(self.device)).sum().item())

    def gap(self, a, b):
        """(max |a - b|, max |a|) over the vocabulary, per position."""
        return ((a - b).abs().amax(-1).float().cpu().numpy(), a.abs().amax(-1).float().cpu().numpy())


class _MlxProgram:
    def __init__(self, path, B, T):
        import mlx.core as mx
        import mlx.nn as nn
        self.mx, self.nn = mx, nn
        self.fn = mx.import_function(path)

    def forward(self, x):
        out = self.fn(self.mx.array(x.astype(np.int32)))
        if not isinstance(out, (list, tuple)) or len(out) != 1:
            raise ExportError("the exported function does not return exactly one array (the logits)")
        return out[0]

    def nats(self, logits, y, mask):
        mx, n = self.mx, mask.shape[0]
        loss = self.nn.losses.cross_entropy(logits[:n], mx.array(y[:n].astype(np.int32)), reduction="none")
        return float(mx.sum(mx.where(mx.array(mask), loss.astype(mx.float32), 0.0)).item())

    def gap(self, a, b):
        mx = self.mx
        return (np.array(mx.max(mx.abs(a - b), axis=-1).astype(mx.float32)),
                np.array(mx.max(mx.abs(a), axis=-1).astype(mx.float32)))


def _export_failure(what, e):
    """A library's exception as one line (tracebacks of torch's loader say nothing the agent can act on)."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return ExportError(f"{what}: {type(e).__name__}{': ' + first if first else ''}; export with "
                       f"prepare.export_model(...)")


def _check_logits(logits, B, T, vocab):
    if tuple(getattr(logits, "shape", ())) != (B, T, vocab):
        raise ExportError(f"the exported model returns shape {tuple(getattr(logits, 'shape', ()))}, not the logits "
                          f"({B}, {T}, {vocab}): export forward(idx) with targets=None")
    return logits


def _check_causal(program, x, logits, n, vocab):
    """Each row again with every token from a secret random position on replaced: the logits before that position
    must not move. A model that looks at later inputs sees the targets (they are the inputs shifted by one)."""
    rng = np.random.default_rng()  # fresh entropy: the positions cannot be known in advance
    B, T = x.shape
    if T < 2:
        return
    cuts = rng.integers(1, T, size=B)
    changed = x.copy()
    for r, c in enumerate(cuts):
        changed[r, c:] = (x[r, c:] + rng.integers(1, vocab, size=T - c)) % vocab
    gap, scale = program.gap(logits, _check_logits(program.forward(changed), B, T, vocab))
    before = (np.arange(T)[None, :] < cuts[:, None]) & (np.arange(B)[:, None] < n)
    bad = np.argwhere(before & ~(gap <= CAUSAL_TOLERANCE * np.maximum(1.0, scale)))
    if len(bad):
        r, t = bad[0]
        raise ExportError(f"the exported model looks ahead: its logits at position {t} change when the tokens from "
                          f"position {cuts[r]} on change; a causal model is required (the targets are the inputs "
                          f"shifted by one)")


def evaluate_export(run_dir):
    """val_bpb of the model export_model() left in run_dir, with evaluate_bpb's rows and math: the sum of per-token
    nats over targets with byte length > 0, divided by ln 2 x their bytes. The program gets the inputs only, in
    batches of the export's fixed size (the last one padded); the cross-entropy is computed here. seconds: this
    function's time; load_seconds: its part until the program was loaded (the framework's import included)."""
    t0 = time.time()
    tokenizer = Tokenizer.from_directory()
    token_bytes = get_token_bytes(tokenizer)
    T, vocab = MAX_SEQ_LEN, len(token_bytes)
    meta = _read_export_meta(run_dir, T, vocab)
    B = meta["batch"]
    rows = eval_rows(tokenizer, T)
    nbytes_all = token_bytes[rows[:, 1:]]
    total_bytes = int(nbytes_all.sum())
    if total_bytes == 0:
        raise PrepareError("the evaluation set has no bytes (only special tokens)")
    path = os.path.join(run_dir, EXPORT_FILES[meta["format"]])
    if not os.path.isfile(path):
        raise ExportError(f"{EXPORT_META} names {meta['format']} but {path} is missing: export with "
                          f"prepare.export_model(...)")
    try:
        program = (_TorchProgram if meta["format"] == "torch.export" else _MlxProgram)(path, B, T)
    except ExportError:
        raise
    except Exception as e:
        raise _export_failure(f"cannot load {path}", e)
    loaded = time.time()
    total_nats = 0.0
    for i in range(0, len(rows), B):
        chunk = rows[i:i + B]
        n = len(chunk)
        x, y = np.zeros((B, T), dtype=np.int64), np.zeros((B, T), dtype=np.int64)
        x[:n], y[:n] = chunk[:, :-1], chunk[:, 1:]
        try:
            logits = _check_logits(program.forward(x), B, T, vocab)
        except ExportError:
            raise
        except Exception as e:
            raise _export_failure(f"the exported model failed on an evaluation batch of shape ({B}, {T})", e)
        total_nats += program.nats(logits, y, nbytes_all[i:i + n] > 0)
        if i == 0:
            _check_causal(program, x, logits, n, vocab)
    val_bpb = total_nats / (math.log(2) * total_bytes)
    if not math.isfinite(val_bpb):
        raise ExportError(f"the exported model's loss is {val_bpb} (its logits are not finite)")
    return {"val_bpb": val_bpb, "tokens": int(rows.shape[0] * T), "seconds": round(time.time() - t0, 3),
            "load_seconds": round(loaded - t0, 3), "model": meta["file"]}

# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _positive_or_all(value):
    n = int(value)
    if n < -1:
        raise argparse.ArgumentTypeError("use a number of shards, or -1 for all")
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="prepare.py",  # also when the engine runs this file's text from stdin (tui/sealed.py)
        description="Prepare data for autoresearch: download climbmix (or import local text), train the tokenizer, "
                    "build the token cache.",
        epilog="Environment: AUTORESEARCH_CACHE_DIR, AUTORESEARCH_DATASET, AUTORESEARCH_PROFILE, HF_ENDPOINT.")
    parser.add_argument("--num-shards", type=_positive_or_all, default=10,
                        help="climbmix training shards to download (default 10, -1 = all %d)" % MAX_SHARD)
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    parser.add_argument("--text", nargs="+", metavar="PATH",
                        help="import local files, folders or globs (.txt .md .jsonl .parquet) instead of downloading")
    parser.add_argument("--name", default=None,
                        help="dataset name for --text (default 'local'); otherwise the dataset to prepare "
                             "(default AUTORESEARCH_DATASET or climbmix)")
    parser.add_argument("--profile", choices=sorted(PROFILES),
                        help="record this evaluation profile for this machine, for every backend (default: each "
                             "backend's own: gpu for cuda, apple for Apple Silicon, cpu for the CPU backends)")
    parser.add_argument("--evaluate", metavar="RUN_DIR",
                        help="score the model a trainer exported to RUN_DIR (export_model) and print one JSON line "
                             "(the agent loop's sealed evaluation)")
    args = parser.parse_args(argv)
    if args.evaluate:
        print(json.dumps(evaluate_export(args.evaluate)), flush=True)
        return
    if args.download_workers < 1:
        parser.error("--download-workers must be at least 1")

    t0 = time.time()
    if args.text:
        name = _check_dataset_name(args.name or "local")
        import_local_text(args.text, name)
    else:
        name = _check_dataset_name(args.name or DATASET)
        if name == DEFAULT_DATASET:
            n = MAX_SHARD if args.num_shards == -1 else args.num_shards
            download_shards(list(range(n)) + [VAL_SHARD], data_dir(name), workers=args.download_workers)
        else:
            list_shards("train", name)   # a converted/imported dataset must already have its shards
    record_profile(args.profile)
    enc = train_tokenizer(name)
    tokenizer = Tokenizer(enc, tokenizer_dir(name))
    tokenize_dataset(tokenizer, name)
    profile = get_profile()
    print(f"Evaluation profile: {profile.describe()}")
    print(f"Done in {time.time() - t0:.0f}s. Dataset {name!r} is ready in {dataset_dir(name)}")
    if name != DATASET:
        print(f"Train on it with: AUTORESEARCH_DATASET={name} uv run train.py")


if __name__ == "__main__":
    main()
