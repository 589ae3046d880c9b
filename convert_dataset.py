"""
Convert a Hugging Face dataset into autoresearch's shard layout, then train its tokenizer and build its token cache.

Usage:
    uv run convert_dataset.py --list                              # the registry, and what is prepared (with sizes)
    uv run convert_dataset.py fineweb-edu                         # 10 training shards + the validation shard
    uv run convert_dataset.py fineweb-edu-high --num-shards 4 --dry-run
    uv run convert_dataset.py slimpajama --revision <40-hex commit>
    uv run convert_dataset.py --text notes/ '*.md' --name mynotes # local files (the same path as prepare.py --text)
    AUTORESEARCH_DATASET=fineweb-edu uv run train.py

Every dataset gets the climbmix layout in its own directory (CACHE_DIR/<name>/data): parquet shards with a single
`text` column, 86,016 documents each, shard_00000.parquet onwards for training and shard_06542.parquet for
validation. The validation shard holds the FIRST documents of the (filtered) source, so it does not change with
--num-shards. Downloads go through prepare.download_files (resumable, retried, verified, HF_ENDPOINT, progress bar)
into CACHE_DIR/raw/, where they stay for the next conversion unless --delete-raw. source.json next to the data
records the repository, the commit the files came from, every file with its size and sha256, row counts and a
sha256 over all documents.

Environment: AUTORESEARCH_CACHE_DIR, HF_ENDPOINT (see prepare.py); AUTORESEARCH_SHARD_ROWS shrinks shards for tests.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import prepare
from prepare import PrepareError
from tui import cli_args
from tui.atomic import write_json_atomic

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

DEFAULT_NUM_SHARDS = 10
DEFAULT_WORKERS = 4
MIN_CHARS = 50                   # shorter documents are dropped (stubs, empty rows)
READ_BATCH_ROWS = 1024           # rows per parquet batch: memory stays at one batch plus one shard
HEAD_TIMEOUT = 15
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def shard_rows():
    """Documents per shard: prepare.SHARD_ROWS, or AUTORESEARCH_SHARD_ROWS for tests and tiny smoke runs."""
    raw = os.environ.get("AUTORESEARCH_SHARD_ROWS")
    if not raw:
        return prepare.SHARD_ROWS
    if not raw.isdigit() or int(raw) < 1:
        raise PrepareError(f"AUTORESEARCH_SHARD_ROWS={raw!r} must be a positive whole number")
    return int(raw)

# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
# revision: a 40-hex commit pins exactly which files are fetched. None = not pinned: the branch is resolved to its
# current commit when you convert (the commit is recorded in source.json and printed), so a later conversion may
# see different data unless you pass that commit back with --revision.
#
# Where the pinned commits come from: each one is pinned, together with the same file paths, by several unrelated
# public projects (dataset cards and download manifests), e.g. fineweb-edu 87f09149 with all 14 sample/10BT files
# (9,672,101 rows), smollm-corpus 3ba9d605 with cosmopedia-v2/train-00000-of-00104.parquet, TinyStories f54c09fd with
# TinyStoriesV2-GPT4-train.txt. They were not fetched from the Hub by us: if one is wrong, the download fails with
# HTTP 404 and --revision overrides it.
# Unverified (no public commit found): climbmix (main), and SlimPajama-6B and github-code-clean, whose parquet comes
# from the Hub's auto-converted refs/convert/parquet branch, which the Hub may rebuild at any time.


@dataclass(frozen=True)
class Source:
    name: str
    repo: str                    # Hugging Face dataset repository
    files: tuple                 # paths inside the repository, in reading order
    revision: str | None         # pinned commit, or None (resolve `branch` at conversion time)
    branch: str = "main"
    column: str = "text"         # the source column that becomes `text`
    fmt: str = "parquet"         # parquet | txt (documents separated by `separator`)
    separator: str = ""
    filter: tuple | None = None  # (column, op, value): keep rows where `column op value`
    approx_docs: int = 0         # documents in all files (from the card), for --dry-run estimates; 0 = unknown
    native: bool = False         # already in the climbmix layout: shards are downloaded as they are
    about: str = ""

    def describe_filter(self):
        return f"{self.filter[0]} {self.filter[1]} {self.filter[2]}" if self.filter else "-"


def _numbered(pattern, n):
    return tuple(pattern.format(i) for i in range(n))


_FINEWEB_EDU = _numbered("sample/10BT/{:03d}_00000.parquet", 14)

REGISTRY = {s.name: s for s in [
    Source("climbmix", prepare.CLIMBMIX_REPO, (), None, native=True,
           about="NVIDIA ClimbMix, shuffled (upstream's data); the default"),
    Source("fineweb-edu", "HuggingFaceFW/fineweb-edu", _FINEWEB_EDU, "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9",
           approx_docs=9_672_101, about="educational web pages, 10BT sample (~2 GB per file)"),
    # FineWeb-Edu itself already keeps int_score >= 3 (the seed's filter, which therefore removed nothing);
    # >= 4 keeps the clearly educational minority, so expect to download several times more files.
    Source("fineweb-edu-high", "HuggingFaceFW/fineweb-edu", _FINEWEB_EDU, "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9",
           filter=("int_score", ">=", 4), approx_docs=9_672_101,
           about="fineweb-edu documents with educational score >= 4 only"),
    Source("cosmopedia-v2", "HuggingFaceTB/smollm-corpus",
           _numbered("cosmopedia-v2/train-{:05d}-of-00104.parquet", 104), "3ba9d605774198c5868892d7a8deda78031a781f",
           approx_docs=39_000_000,
           about="synthetic textbooks, blog posts and stories (SmolLM corpus, ~1.2 GB per file)"),
    Source("slimpajama", "DKYoon/SlimPajama-6B", _numbered("default/train/{:04d}.parquet", 48), None,
           branch="refs/convert/parquet", about="6B-token SlimPajama sample: web, books, code, papers, wiki"),
    Source("tinystories", "roneneldan/TinyStories", ("TinyStoriesV2-GPT4-train.txt",),
           "f54c09fd23315a6f9c86f9dc80f725de7d8f9c64", fmt="txt", separator="<|endoftext|>",
           about="GPT-4 written short stories for small children (V2, one 2.2 GB text file)"),
    # smollm-corpus python-edu ships only blob ids (the code itself is on Software Heritage), so its current
    # equivalent with text on the Hub is deduplicated GitHub Python.
    Source("github-code-python", "codeparrot/github-code-clean",
           _numbered("Python-all/partial-train/{:04d}.parquet", 10), None, branch="refs/convert/parquet",
           column="code", approx_docs=645_000,
           about="deduplicated GitHub Python files, all licenses (stands in for python-edu)"),
]}

# ---------------------------------------------------------------------------
# Revisions and URLs
# ---------------------------------------------------------------------------

def file_url(repo, path, revision):
    return prepare.hf_file_url(repo, path, revision)


def _offline(detail):
    return prepare.DownloadError(f"cannot reach {prepare.hf_endpoint()} ({detail}). Set HF_ENDPOINT to a reachable "
                                 f"mirror, or prepare offline from local files: uv run convert_dataset.py --text PATH")


def _head(url):
    import requests
    try:
        return requests.head(url, allow_redirects=False, timeout=HEAD_TIMEOUT)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _offline(type(e).__name__)


def resolve_revision(source, revision):
    """(commit or branch to download from, how it was chosen). A branch or tag is resolved to its commit through
    the X-Repo-Commit header of the Hub's resolve endpoint, so every file comes from the same commit."""
    if COMMIT_RE.match(revision):
        return revision, "pinned"
    probe = source.files[0] if source.files else prepare.SHARD_NAME.format(0)
    r = _head(file_url(source.repo, probe, revision))
    if r.status_code == 404:
        raise PrepareError(f"{source.repo} has no {probe} at revision {revision!r} (HTTP 404); check --revision")
    commit = r.headers.get("X-Repo-Commit", "")
    if COMMIT_RE.match(commit):
        return commit, f"resolved from {revision}"
    print(f"warning: {prepare.hf_endpoint()} did not say which commit {revision!r} is; downloading from the "
          f"branch itself (the files may change between downloads)")
    return revision, "unresolved branch"


def remote_size(url):
    """Bytes of a remote file (Hub LFS files answer HEAD with X-Linked-Size before redirecting), None if unknown,
    -1 if the file does not exist."""
    r = _head(url)
    if r.status_code == 404:
        return -1
    size = r.headers.get("X-Linked-Size") or (r.headers.get("Content-Length") if r.status_code == 200 else None)
    if size is None and r.is_redirect:
        import requests
        try:
            size = requests.head(url, allow_redirects=True, timeout=HEAD_TIMEOUT).headers.get("Content-Length")
        except requests.RequestException:
            return None
    return int(size) if size and size.isdigit() else None


def raw_dir(repo, revision):
    return os.path.join(prepare.CACHE_DIR, "raw", repo.replace("/", "__"), revision.replace("/", "_"))

# ---------------------------------------------------------------------------
# Reading source documents (streaming: one batch of rows at a time)
# ---------------------------------------------------------------------------

_OPS = {">=": pc.greater_equal, ">": pc.greater, "<=": pc.less_equal, "<": pc.less, "==": pc.equal,
        "!=": pc.not_equal}


def check_text_file(path):
    """download_files verifier for text sources: non-empty and UTF-8 at the start (not an HTML error page)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e.strerror})")
    if not head:
        raise PrepareError(f"{path} is empty")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:   # a multi-byte character cut at the end of the sample is fine
            raise PrepareError(f"{path} is not UTF-8 text")
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        raise PrepareError(f"{path} is an HTML page, not the dataset file")


def _keep(texts, extra, source):
    """Arrow mask: non-null, at least MIN_CHARS characters, and the quality filter. Returns (mask, n_long_enough)."""
    long_enough = pc.fill_null(pc.greater_equal(pc.utf8_length(texts), MIN_CHARS), False)
    mask = long_enough
    if source.filter:
        column, op, value = source.filter
        mask = pc.and_(mask, pc.fill_null(_OPS[op](extra, value), False))
    return mask, pc.sum(long_enough).as_py() or 0


def iter_parquet(path, source):
    """Yield (rows read, rows long enough, kept documents as a string array) per batch."""
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if source.column not in names:
        raise PrepareError(f"{os.path.basename(path)} has no column {source.column!r} (columns: {', '.join(names)}); "
                           f"the registry may be out of date: pass --column NAME")
    columns = [source.column]
    if source.filter:
        if source.filter[0] not in names:
            raise PrepareError(f"{os.path.basename(path)} has no column {source.filter[0]!r} for the filter "
                               f"{source.describe_filter()} (columns: {', '.join(names)})")
        columns.append(source.filter[0])
    field = pf.schema_arrow.field(source.column)
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise PrepareError(f"{os.path.basename(path)}: column {source.column!r} holds {field.type}, not text")
    for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
        texts = batch.column(0)
        mask, long_enough = _keep(texts, batch.column(1) if source.filter else None, source)
        yield batch.num_rows, long_enough, pc.filter(texts, mask).cast(pa.string())


def iter_txt(path, source):
    """Yield (documents read, long enough, kept) for a text file of documents separated by source.separator."""
    def batches():
        buf, docs = "", []
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                buf += chunk
                parts = buf.split(source.separator)
                buf = parts.pop()
                docs += [p.strip() for p in parts]
                while len(docs) >= READ_BATCH_ROWS:
                    yield docs[:READ_BATCH_ROWS]
                    docs = docs[READ_BATCH_ROWS:]
        docs.append(buf.strip())
        yield docs

    for docs in batches():
        docs = [d for d in docs if d]
        texts = pa.array(docs, type=pa.string())
        mask, long_enough = _keep(texts, None, replace(source, filter=None))
        yield len(docs), long_enough, pc.filter(texts, mask)


def iter_documents(path, source):
    return iter_txt(path, source) if source.fmt == "txt" else iter_parquet(path, source)

# ---------------------------------------------------------------------------
# Writing shards: the validation shard first, then training shards, each shard_rows() documents
# ---------------------------------------------------------------------------

class ShardWriter:
    def __init__(self, directory, num_train, rows):
        self.directory = directory
        self.num_train = num_train      # -1: as many as the source gives
        self.rows = rows
        self.pending, self.pending_rows = [], 0
        self.shards = []                # (filename, documents) in writing order
        self.documents = 0
        self.hash = hashlib.sha256()    # sha256 of all documents joined by "\0", validation shard first

    @property
    def wanted(self):
        return math.inf if self.num_train < 0 else (self.num_train + 1) * self.rows

    @property
    def full(self):
        return self.documents >= self.wanted

    def add(self, texts):
        """Take documents (an arrow string array) until the wanted number is reached; returns how many were taken."""
        room = self.wanted - self.documents
        if room <= 0:
            return 0
        if len(texts) > room:
            texts = texts.slice(0, int(room))
        if len(texts):
            joined = "\0".join(texts.to_pylist()).encode()
            self.hash.update((b"\0" if self.documents else b"") + joined)
            self.pending.append(texts)
            self.pending_rows += len(texts)
            self.documents += len(texts)
        while self.pending_rows >= self.rows:
            self._flush(self.rows)
        return len(texts)

    def _flush(self, n):
        block = pa.concat_arrays(self.pending)
        name = prepare.VAL_FILENAME if not self.shards else prepare.SHARD_NAME.format(len(self.shards) - 1)
        prepare.write_shard(os.path.join(self.directory, name), block.slice(0, n))
        self.shards.append((name, n))
        rest = block.slice(n)
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)

    def finish(self):
        """Write the last partial shard (the source ran out). Raises unless there is validation and training data."""
        if self.shards and self.pending_rows:
            self._flush(self.pending_rows)
        if len(self.shards) < 2:
            raise PrepareError(f"the source has only {self.documents:,} usable documents; a dataset needs one full "
                               f"validation shard ({self.rows:,}) plus training documents. For small data use: "
                               f"uv run convert_dataset.py --text PATH --name NAME")
        return self.shards

# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------

def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _staging_dir(name):
    """A fresh directory for the new shards (the old dataset stays usable until the conversion succeeded)."""
    base = prepare.dataset_dir(name)
    os.makedirs(base, exist_ok=True)
    for entry in os.listdir(base):
        m = re.fullmatch(r"\.converting-(\d+)", entry)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(base, entry), ignore_errors=True)   # left by a killed conversion
    path = os.path.join(base, f".converting-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _install(staging, name):
    """Swap the new shards in; the old tokenizer (and its token cache) belonged to the old data."""
    final = prepare.data_dir(name)
    shutil.rmtree(prepare.tokenizer_dir(name), ignore_errors=True)
    old = f"{final}.old-{os.getpid()}"
    if os.path.isdir(final):
        os.rename(final, old)
    os.rename(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_manifest(name, manifest):
    path = os.path.join(prepare.dataset_dir(name), "source.json")
    write_json_atomic(path, manifest)


def read_manifest(name):
    try:
        with open(os.path.join(prepare.dataset_dir(name), "source.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _download(source, revision, paths, workers):
    jobs = [(file_url(source.repo, p, revision), os.path.join(raw_dir(source.repo, revision), p)) for p in paths]
    verify = check_text_file if source.fmt == "txt" else prepare.check_parquet
    try:
        prepare.download_files(jobs, workers=workers, verify=verify, what=f"file(s) of {source.repo}")
    except prepare.DownloadError as e:
        if "HTTP 404" in str(e):
            raise prepare.DownloadError(f"{e}. The registry entry may be out of date: check the file list on the Hub "
                                        f"and pass --revision COMMIT") from None
        raise
    return [dest for _, dest in jobs]


def convert(source, name, num_train, revision, workers, delete_raw):
    """Download what is needed and write the shards of dataset `name`. Returns the manifest."""
    rows = shard_rows()
    staging = _staging_dir(name)
    writer = ShardWriter(staging, num_train, rows)
    files, i = [], 0
    t0 = time.time()
    try:
        while not writer.full and i < len(source.files):
            # one file first; then as many as the documents per file so far suggest, at most `workers` at a time
            if not files:
                n = 1
            elif num_train < 0:
                n = workers
            else:
                per_file = max(1, writer.documents / len(files))
                n = max(1, min(workers, math.ceil((writer.wanted - writer.documents) / per_file)))
            batch = source.files[i:i + n]
            i += len(batch)
            for path, local in zip(batch, _download(source, revision, batch, workers)):
                if writer.full:
                    break
                info = dict(path=path, size=os.path.getsize(local), sha256=_sha256_file(local), rows_read=0,
                            long_enough=0, documents=0, complete=True)
                batches = iter_documents(local, source)
                for n_read, n_long, kept in batches:
                    info["rows_read"] += n_read
                    info["long_enough"] += n_long
                    info["documents"] += writer.add(kept)
                    if writer.full:
                        info["complete"] = next(batches, None) is None   # the rest of the file was not needed
                        break
                files.append(info)
                print(f"  {path}: {info['rows_read']:,} rows read, {info['documents']:,} documents kept"
                      + ("" if info["complete"] else " (enough documents: stopped here)"), flush=True)
                if delete_raw:
                    os.remove(local)
        if not writer.full and num_train >= 0:
            print(f"warning: the source ran out after {writer.documents:,} documents "
                  f"(wanted {writer.wanted:,}); writing what there is")
        shards = writer.finish()
        _install(staging, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    val_docs = shards[0][1]
    manifest = dict(
        name=name, source="huggingface", registry=source.name, repo=source.repo, endpoint=prepare.hf_endpoint(),
        revision=revision, column=source.column, format=source.fmt, filter=source.describe_filter(),
        min_chars=MIN_CHARS, shard_rows=rows, num_shards_requested=num_train, files=files,
        documents=writer.documents, val_documents=val_docs, train_documents=writer.documents - val_docs,
        train_shards=len(shards) - 1, text_sha256=writer.hash.hexdigest(),
        converted_at=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=round(time.time() - t0, 1))
    return manifest


def convert_native(source, name, num_train, revision, workers):
    """climbmix: the shards already have our layout; download them in place (like prepare.py), pinned to a commit."""
    n = prepare.MAX_SHARD if num_train < 0 else min(num_train, prepare.MAX_SHARD)
    names = [prepare.SHARD_NAME.format(i) for i in range(n)] + [prepare.VAL_FILENAME]
    d = prepare.data_dir(name)
    jobs = [(file_url(source.repo, f, revision), os.path.join(d, f)) for f in names]
    t0 = time.time()
    prepare.download_files(jobs, workers=workers, verify=prepare.check_shard, what=f"shard(s) of {source.repo}")
    for extra in sorted(set(os.listdir(d)) - set(names)):
        if re.fullmatch(r"shard_\d{5}\.parquet", extra):
            os.remove(os.path.join(d, extra))          # shards beyond --num-shards from an earlier run
    h, files, documents = hashlib.sha256(), [], 0
    for f in [prepare.VAL_FILENAME] + names[:-1]:      # validation first, like converted datasets
        path = os.path.join(d, f)
        for texts in prepare.iter_shard_texts(path):
            if texts:
                h.update((b"\0" if documents else b"") + "\0".join(texts).encode())
                documents += len(texts)
        files.append(dict(path=f, size=os.path.getsize(path), sha256=_sha256_file(path),
                          rows_read=pq.ParquetFile(path).metadata.num_rows, complete=True))
    val_docs = files[0]["rows_read"]
    return dict(name=name, source="huggingface", registry=source.name, repo=source.repo,
                endpoint=prepare.hf_endpoint(), revision=revision, column="text", format="parquet", filter="-",
                min_chars=0, shard_rows=None, num_shards_requested=num_train, files=files, documents=documents,
                val_documents=val_docs, train_documents=documents - val_docs, train_shards=n,
                text_sha256=h.hexdigest(), converted_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                seconds=round(time.time() - t0, 1))


def build_tokenizer(name):
    """prepare.py's tokenizer training and token cache for dataset `name`."""
    prepare.record_profile()
    enc = prepare.train_tokenizer(name)
    prepare.tokenize_dataset(prepare.Tokenizer(enc, prepare.tokenizer_dir(name)), name)

# ---------------------------------------------------------------------------
# What is prepared
# ---------------------------------------------------------------------------

def _du(path):
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def human(n):
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def prepared_info(name):
    """What exists for dataset `name`: shards, documents, sizes, tokenizer. ready = the trainers can use it."""
    d = prepare.data_dir(name)
    shards = sorted(f for f in os.listdir(d) if re.fullmatch(r"shard_\d{5}\.parquet", f)) if os.path.isdir(d) else []
    train = [f for f in shards if f != prepare.VAL_FILENAME]
    docs = 0
    for f in shards:
        try:
            docs += pq.ParquetFile(os.path.join(d, f)).metadata.num_rows
        except Exception:
            pass
    tok = prepare.tokenizer_dir(name)
    has_tok = all(os.path.exists(os.path.join(tok, f)) for f in ("tokenizer.pkl", "token_bytes.npy"))
    return dict(name=name, train_shards=len(train), val_shard=prepare.VAL_FILENAME in shards, documents=docs,
                data_bytes=_du(d) if shards else 0, tokenizer=has_tok,
                token_cache_bytes=_du(os.path.join(tok, "tokens")), manifest=read_manifest(name),
                ready=bool(train) and prepare.VAL_FILENAME in shards and has_tok)


def fingerprint(name):
    """What identifies a prepared dataset's contents: source.json's sha256 over all documents when there is one,
    else a sha256 over the shard files themselves (e.g. climbmix downloaded by prepare.py)."""
    m = read_manifest(name)
    if m and m.get("text_sha256"):
        return f"text:{m['text_sha256']}"
    d = prepare.data_dir(name)
    h = hashlib.sha256()
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if re.fullmatch(r"shard_\d{5}\.parquet", f):
            h.update(f.encode() + b"\0" + _sha256_file(os.path.join(d, f)).encode())
    return f"files:{h.hexdigest()}"


def list_command():
    print("Datasets you can convert (uv run convert_dataset.py NAME):")
    for s in REGISTRY.values():
        rev = f"{s.revision[:12]} (pinned)" if s.revision else f"{s.branch} (not pinned: resolved when converting)"
        if s.native:
            layout = "climbmix shards as they are"
        elif s.fmt == "txt":
            layout = f"{len(s.files)} text file(s), documents separated by {s.separator!r}"
        else:
            layout = f"{len(s.files)} parquet file(s), column {s.column!r}" + (
                f", filter {s.describe_filter()}" if s.filter else "")
        print(f"  {s.name:<20} {s.about}")
        print(f"  {'':<20} {s.repo} @ {rev}; {layout}")
    names = prepare.list_datasets()
    print(f"\nPrepared in {prepare.CACHE_DIR}:" + ("" if names else " nothing yet"))
    if names:
        print(f"  {'name':<20} {'shards':<9} {'documents':>11} {'data':>9} {'tokenizer':<10} {'token cache':>11}  "
              f"source")
        for n in names:
            info = prepared_info(n)
            m = info["manifest"] or {}
            if m.get("repo"):
                src = f"{m['repo']} @ {str(m.get('revision'))[:12]}" + (
                    f", {m['filter']}" if m.get("filter") not in (None, "-") else "")
            else:
                src = m.get("source") or ("climbmix (prepare.py)" if n == prepare.DEFAULT_DATASET else "?")
            shards = f"{info['train_shards']}" + ("+val" if info["val_shard"] else " (no val)")
            print(f"  {n:<20} {shards:<9} {info['documents']:>11,} {human(info['data_bytes']):>9} "
                  f"{'yes' if info['tokenizer'] else 'no':<10} {human(info['token_cache_bytes']):>11}  {src}")
    raw = os.path.join(prepare.CACHE_DIR, "raw")
    if os.path.isdir(raw):
        print(f"\nDownloaded source files: {raw} ({human(_du(raw))}; delete to free space, or convert with "
              f"--delete-raw)")

# ---------------------------------------------------------------------------
# Dry run
# ---------------------------------------------------------------------------

def dry_run(source, name, num_train, revision, workers):
    rows = shard_rows()
    print(f"Dry run for {name}: nothing is downloaded or written.")
    print(f"  source:   {source.repo}  ({source.about})")
    try:
        resolved, how = resolve_revision(source, revision)
        print(f"  revision: {resolved} ({how})")
    except PrepareError as e:
        resolved = revision
        print(f"  revision: {revision} (could not check: {e})")
    if source.native:
        n = prepare.MAX_SHARD if num_train < 0 else num_train
        paths = [prepare.SHARD_NAME.format(i) for i in range(n)] + [prepare.VAL_FILENAME]
        print(f"  wanted:   {n} training shard(s) + the validation shard {prepare.VAL_FILENAME}, as they are")
        shown, needed = paths if len(paths) <= 12 else paths[:11] + paths[-1:], len(paths)
    else:
        wanted = "all the source has" if num_train < 0 else f"{(num_train + 1) * rows:,} documents"
        print(f"  wanted:   1 validation + {'all' if num_train < 0 else num_train} training shard(s) of {rows:,} "
              f"documents = {wanted}")
        column = (f"column {source.column!r} -> text" if source.column != "text" else "column 'text'") \
            if source.fmt == "parquet" else f"documents separated by {source.separator!r}"
        print(f"  reading:  {column}; filter: {source.describe_filter()}; documents shorter than {MIN_CHARS} "
              f"characters are dropped")
        if num_train >= 0 and source.approx_docs and not source.filter:
            per_file = source.approx_docs / len(source.files)
            needed = min(len(source.files), math.ceil((num_train + 1) * rows / per_file))
            print(f"  files:    about {needed} of {len(source.files)} (~{per_file:,.0f} documents each)")
        else:
            needed = len(source.files)
            print(f"  files:    up to {needed} (how many depends on the filter and the documents per file); "
                  f"fetched {workers} at a time until there are enough")
        shown = list(source.files[:max(needed, 1)] if needed <= 12 else source.files[:12])
    total, known = 0, True
    for p in shown:
        url = file_url(source.repo, p, resolved)
        size = None
        if known:
            try:
                size = remote_size(url)
            except PrepareError:
                known = False
        known = known and size is not None and size >= 0
        total += max(size or 0, 0)
        print(f"    {url}  " + ("NOT FOUND (HTTP 404)" if size == -1 else human(size) if size is not None
                                 else "size unknown"))
    if len(shown) < needed:
        print(f"    ... {needed - len(shown)} more")
    if known and shown:
        est = total * needed / len(shown)
        print(f"  download: ~{human(est)}" + ("" if source.native else f" into {raw_dir(source.repo, resolved)}"))
    print(f"  output:   {prepare.data_dir(name)}, then the tokenizer and token cache in {prepare.tokenizer_dir(name)}")

# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _num_shards(value):
    n = cli_args.whole_number(value)
    if n < -1 or n == 0:
        raise argparse.ArgumentTypeError("use a number of training shards (at least 1), or -1 for all")
    return n


def build_parser():
    p = argparse.ArgumentParser(
        prog="convert_dataset.py",
        description="Convert a Hugging Face dataset (or local files) into autoresearch's shard layout, then train its "
                    "tokenizer and token cache.",
        epilog="datasets: " + ", ".join(REGISTRY) + ". Train on one with AUTORESEARCH_DATASET=NAME uv run train.py. "
               "Environment: AUTORESEARCH_CACHE_DIR, HF_ENDPOINT.")
    p.add_argument("dataset", nargs="?", help="registry name (see --list)")
    p.add_argument("--list", action="store_true", help="show the registry and the prepared datasets with sizes")
    p.add_argument("--dry-run", action="store_true",
                   help="show the revision, URLs and sizes; download and write nothing")
    p.add_argument("--num-shards", type=_num_shards, default=DEFAULT_NUM_SHARDS,
                   help=f"training shards to write, besides the validation shard (default {DEFAULT_NUM_SHARDS}; "
                        f"-1 = everything the source has)")
    p.add_argument("--revision", default=None,
                   help="commit (or branch/tag, resolved to its commit) to download from instead of the registry's")
    p.add_argument("--column", default=None, help="source column holding the text (default: the registry's)")
    p.add_argument("--name", default=None,
                   help="name of the prepared dataset (default: the registry name; 'local' with --text)")
    p.add_argument("--workers", type=cli_args.positive_int, default=DEFAULT_WORKERS,
                   help=f"parallel downloads (default {DEFAULT_WORKERS})")
    p.add_argument("--delete-raw", action="store_true",
                   help="delete each downloaded source file once converted (default: keep for the next conversion)")
    p.add_argument("--force", action="store_true", help="convert again even if the same conversion is prepared")
    p.add_argument("--text", nargs="+", metavar="PATH",
                   help="import local .txt/.md/.jsonl/.parquet files, folders or globs instead (prepare.py --text)")
    return p


def _already_prepared(name, source, revision, num_train):
    m, info = read_manifest(name), prepared_info(name)
    return bool(m and info["ready"] and m.get("repo") == source.repo and m.get("revision") == revision
                and m.get("column") == (source.column if not source.native else "text")
                and m.get("filter") == source.describe_filter() and m.get("num_shards_requested") == num_train
                and m.get("shard_rows") == (None if source.native else shard_rows()))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        list_command()
        return 0
    if args.text:
        if args.dataset:
            parser.error("give either a registry dataset or --text, not both")
        if args.dry_run:
            parser.error("--dry-run applies to registry datasets, not to --text")
        name = args.name or "local"
        prepare.import_local_text(args.text, name)
        build_tokenizer(name)
        print(f"Dataset {name!r} is ready. Train on it with: AUTORESEARCH_DATASET={name} uv run train.py")
        return 0
    if not args.dataset:
        parser.error("name a dataset (see --list), or use --text PATH")
    if args.dataset not in REGISTRY:
        raise PrepareError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(REGISTRY)} "
                           f"(or import local files with --text PATH --name NAME)")
    source = REGISTRY[args.dataset]
    if args.column:
        if source.native or source.fmt != "parquet":
            parser.error(f"--column does not apply to {source.name} (not a parquet source with a text column)")
        source = replace(source, column=args.column)
    name = args.name or source.name
    prepare.dataset_dir(name)   # one-line error for a bad name
    revision = args.revision or source.revision or source.branch
    if args.dry_run:
        dry_run(source, name, args.num_shards, revision, args.workers)
        return 0

    revision, how = resolve_revision(source, revision)
    if not args.force and _already_prepared(name, source, revision, args.num_shards):
        print(f"{name} is already prepared from {source.repo} @ {revision[:12]} with the same settings "
              f"(--force converts again). Train on it with: AUTORESEARCH_DATASET={name} uv run train.py")
        return 0
    print(f"Converting {source.repo} @ {revision} ({how}) into dataset {name!r}: "
          f"{'all' if args.num_shards < 0 else args.num_shards} training shard(s) + validation", flush=True)
    if source.native:
        manifest = convert_native(source, name, args.num_shards, revision, args.workers)
    else:
        manifest = convert(source, name, args.num_shards, revision, args.workers, args.delete_raw)
    manifest["revision_source"] = how
    _write_manifest(name, manifest)
    print(f"Wrote {manifest['train_shards']} training shard(s) + validation to {prepare.data_dir(name)}: "
          f"{manifest['documents']:,} documents ({manifest['val_documents']:,} for validation), text sha256 "
          f"{manifest['text_sha256'][:16]}...", flush=True)
    if how != "pinned":
        print(f"note: {source.name} is not pinned in the registry; reproduce this data with --revision {revision}")
    build_tokenizer(name)
    print(f"Dataset {name!r} is ready. Train on it with: AUTORESEARCH_DATASET={name} uv run train.py")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: the prepared data was not changed; downloads resume on the next run", file=sys.stderr)
        sys.exit(130)
