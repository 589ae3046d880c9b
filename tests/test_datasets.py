"""convert_dataset.py against a real local server laid out like the Hugging Face endpoint: every source format of the
registry (column names, a quality filter, several files, a text file, the native climbmix layout), revision pinning
and resolution, the validation rule, dry run, --list, one-line errors, and a real training run on converted data."""

import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import datagen
from hfserver import FakeHub
from trainer_fixtures import ROOT, TINY_SEQ_LEN, parse_summary, run_script, scrubbed_env, tiny_scripts

SHA_A = "a" * 40
SHA_B = "b" * 40
ROWS = 100   # AUTORESEARCH_SHARD_ROWS in these tests

# ---------------------------------------------------------------------------
# A Hub that also says which commit a branch is (the real Hub's X-Repo-Commit header)
# ---------------------------------------------------------------------------


class Hub(FakeHub):
    def __init__(self):
        super().__init__()
        self.branches = {}   # (repo, branch as it appears in the URL) -> commit
        self.urls = []       # every GET's full path (FakeHub.requests keeps only the file path)
        hub = self
        base = self.server.RequestHandlerClass

        class Handler(base):
            def do_GET(self, head=False):
                if not head:
                    with hub.lock:
                        hub.urls.append(self.path)
                super().do_GET(head)

            def send_response(self, code, message=None):
                super().send_response(code, message)
                parts = self.path.split("?")[0].split("/")
                if len(parts) >= 7 and parts[1] == "datasets" and code < 400:
                    repo, rev = f"{parts[2]}/{parts[3]}", parts[5]
                    commit = hub.branches.get((repo, rev), rev if len(rev) == 40 else None)
                    if commit:
                        self.send_header("X-Repo-Commit", commit)

        self.server.RequestHandlerClass = Handler

    def publish(self, repo, path, data, commit, branch=None):
        """A file at `commit`; when `branch` is given, that branch points at `commit` (and serves it too)."""
        self.add(repo, path, data, revision=commit)
        if branch:
            quoted = urllib.parse.quote(branch, safe="")
            self.branches[(repo, quoted)] = commit
            self.add(repo, path, data, revision=quoted)

    def gets(self):
        return [path for path, _, _ in self.requests]


def parquet_bytes(columns):
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, row_group_size=64)
    return buf.getvalue()


def shard_texts(path):
    return pq.read_table(path).column("text").to_pylist()


def text_sha256(docs):
    return hashlib.sha256("\0".join(docs).encode()).hexdigest()


@pytest.fixture
def cd(tmp_path, monkeypatch):
    """convert_dataset (and prepare) freshly imported against an empty cache, with 100-document shards."""
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "cpu")
    monkeypatch.setenv("AUTORESEARCH_SHARD_ROWS", str(ROWS))
    for var in ("AUTORESEARCH_DATASET", "AUTORESEARCH_EVAL_TOKENS", "AUTORESEARCH_MAX_SEQ_LEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    import convert_dataset
    import prepare
    importlib.reload(prepare)
    yield importlib.reload(convert_dataset)
    monkeypatch.undo()
    importlib.reload(prepare)
    importlib.reload(convert_dataset)


@pytest.fixture
def hub(monkeypatch):
    with Hub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def data(cd, name):
    return os.path.join(cd.prepare.CACHE_DIR, name, "data")

# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------


def test_registry_entries_are_complete_and_pinned_or_honestly_unpinned(cd):
    expected = {"climbmix", "fineweb-edu", "fineweb-edu-high", "cosmopedia-v2", "slimpajama", "tinystories",
                "github-code-python"}
    assert expected <= set(cd.REGISTRY)
    for s in cd.REGISTRY.values():
        assert s.revision is None or cd.COMMIT_RE.match(s.revision), s.name   # a commit, never a branch name
        assert s.native or (s.files and len(set(s.files)) == len(s.files)), s.name
        assert s.fmt in ("parquet", "txt") and (s.fmt != "txt" or s.separator)
        assert s.filter is None or s.filter[1] in cd._OPS
    assert cd.REGISTRY["fineweb-edu-high"].filter == ("int_score", ">=", 4)
    assert cd.REGISTRY["github-code-python"].column == "code"

# ---------------------------------------------------------------------------
# Conversions, one per source format
# ---------------------------------------------------------------------------


def test_filtered_multi_file_parquet_becomes_shards_validation_first(cd, hub, capsys):
    repo, commit = "HuggingFaceFW/fineweb-edu", cd.REGISTRY["fineweb-edu-high"].revision
    kept, served = [], {}
    for i in range(6):
        docs = datagen.make_documents(200, seed=i, max_words=60)
        scores = [4 + (j % 2) if j % 2 else 2 + (j % 4 == 0) for j in range(200)]   # half pass int_score >= 4
        texts = docs + ["too short", None]            # dropped although their score passes
        served[i] = parquet_bytes({"text": texts, "id": [f"<urn:{i}:{j}>" for j in range(202)],
                                   "score": [float(s) for s in scores + [5, 5]], "int_score": scores + [5, 5]})
        hub.publish(repo, f"sample/10BT/{i:03d}_00000.parquet", served[i], commit)
        kept += [d for d, s in zip(docs, scores) if s >= 4]
    assert cd.main(["fineweb-edu-high", "--num-shards", "3"]) == 0

    d = data(cd, "fineweb-edu-high")
    assert sorted(os.listdir(d)) == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet",
                                     "shard_06542.parquet"]
    assert shard_texts(os.path.join(d, "shard_06542.parquet")) == kept[:ROWS]   # validation = the first documents
    train = sum((shard_texts(os.path.join(d, f"shard_{k:05d}.parquet")) for k in range(3)), [])
    assert train == kept[ROWS:4 * ROWS]
    assert pq.read_schema(os.path.join(d, "shard_00000.parquet")).names == ["text"]
    # three files after the first were enough: the last two were never downloaded
    assert sorted(set(hub.gets())) == [f"sample/10BT/{i:03d}_00000.parquet" for i in range(4)]

    m = json.loads(open(os.path.join(cd.prepare.CACHE_DIR, "fineweb-edu-high", "source.json")).read())
    assert m["revision"] == commit and m["revision_source"] == "pinned" and m["filter"] == "int_score >= 4"
    assert [f["sha256"] for f in m["files"]] == [hashlib.sha256(served[i]).hexdigest() for i in range(4)]
    assert [f["rows_read"] for f in m["files"]] == [202] * 4 and [f["documents"] for f in m["files"]] == [100] * 4
    assert m["text_sha256"] == text_sha256(kept[:4 * ROWS])   # over every document, not just the first
    assert (m["documents"], m["val_documents"], m["train_shards"]) == (400, 100, 3)
    tok = os.path.join(cd.prepare.CACHE_DIR, "fineweb-edu-high", "tokenizer")
    assert os.path.exists(os.path.join(tok, "tokenizer.pkl"))
    assert len([f for f in os.listdir(os.path.join(tok, "tokens")) if f.endswith(".tok.npy")]) == 4
    out = capsys.readouterr().out
    assert "AUTORESEARCH_DATASET=fineweb-edu-high uv run train.py" in out


def test_code_column_unpinned_branch_resolved_to_a_commit_and_source_running_out(cd, hub, capsys):
    repo = "codeparrot/github-code-clean"
    code = []
    for i in range(10):                       # the registry's 10 files, 27 rows each: 270 documents in all
        n = 27
        files = [f"def f{i}_{j}():\n    return {j}  # " + "x" * 40 for j in range(n)]
        hub.publish(repo, f"Python-all/partial-train/{i:04d}.parquet",
                    parquet_bytes({"code": files, "repo_name": ["a/b"] * n, "path": ["m.py"] * n,
                                   "language": ["Python"] * n, "license": ["mit"] * n,
                                   "size": [len(f) for f in files]}),
                    SHA_A, branch="refs/convert/parquet")
        code += files
    assert cd.main(["github-code-python", "--num-shards", "3"]) == 0
    out = capsys.readouterr().out
    assert "the source ran out after 270 documents" in out and f"--revision {SHA_A}" in out
    d = data(cd, "github-code-python")
    assert shard_texts(os.path.join(d, "shard_06542.parquet")) == code[:100]
    assert shard_texts(os.path.join(d, "shard_00000.parquet")) == code[100:200]
    assert shard_texts(os.path.join(d, "shard_00001.parquet")) == code[200:]      # the partial last shard
    assert not os.path.exists(os.path.join(d, "shard_00002.parquet"))
    m = cd.read_manifest("github-code-python")
    assert m["revision"] == SHA_A and m["revision_source"] == "resolved from refs/convert/parquet"
    assert m["column"] == "code" and m["train_shards"] == 2
    assert hub.urls and all(f"/resolve/{SHA_A}/" in u for u in hub.urls)   # every file from the one commit

    # --revision downloads from another commit; the old files stay cached under their own commit
    other = [f"print('other {j}')  # " + "y" * 40 for j in range(250)]
    for i in range(10):
        hub.publish(repo, f"Python-all/partial-train/{i:04d}.parquet",
                    parquet_bytes({"code": other if i == 0 else pa.array([], pa.string())}), SHA_B)
    assert cd.main(["github-code-python", "--num-shards", "-1", "--revision", SHA_B]) == 0   # -1: all of it
    m = cd.read_manifest("github-code-python")
    assert m["revision"] == SHA_B and m["train_shards"] == 2 and m["documents"] == 250
    assert shard_texts(os.path.join(d, "shard_06542.parquet")) == other[:100]
    assert shard_texts(os.path.join(d, "shard_00001.parquet")) == other[200:]
    assert os.path.isdir(cd.raw_dir(repo, SHA_A)) and os.path.isdir(cd.raw_dir(repo, SHA_B))


def test_text_file_source_split_on_its_separator(cd, hub):
    stories = [f"Once upon a time, story {i}.\nLily saw a {'big ' * (i % 5)}dog and smiled." for i in range(230)]
    stories[3] = "The end."                            # too short: dropped
    raw = "".join(s + "\n<|endoftext|>\n" for s in stories).encode()
    hub.publish("roneneldan/TinyStories", "TinyStoriesV2-GPT4-train.txt", raw, cd.REGISTRY["tinystories"].revision)
    assert cd.main(["tinystories", "--num-shards", "1", "--delete-raw"]) == 0
    expected = [s for i, s in enumerate(stories) if i != 3]
    d = data(cd, "tinystories")
    assert shard_texts(os.path.join(d, "shard_06542.parquet")) == expected[:100]
    assert shard_texts(os.path.join(d, "shard_00000.parquet")) == expected[100:200]
    m = cd.read_manifest("tinystories")
    f = m["files"][0]
    assert (f["rows_read"], f["long_enough"], f["documents"]) == (230, 229, 200)   # stopped at 200: enough
    assert f["sha256"] == hashlib.sha256(raw).hexdigest()
    assert not os.path.exists(os.path.join(cd.raw_dir("roneneldan/TinyStories", m["revision"]),
                                           "TinyStoriesV2-GPT4-train.txt"))   # --delete-raw


def test_climbmix_native_shards_pinned_to_the_resolved_commit(cd, hub):
    repo = "karpathy/climbmix-400b-shuffle"
    docs = {}
    for i in (0, 1, 2, 6542):
        docs[i] = datagen.make_documents(30, seed=i, max_words=40)
        hub.publish(repo, f"shard_{i:05d}.parquet", parquet_bytes({"text": docs[i]}), SHA_B, branch="main")
    assert cd.main(["climbmix", "--num-shards", "2"]) == 0
    assert sorted(os.listdir(data(cd, "climbmix"))) == ["shard_00000.parquet", "shard_00001.parquet",
                                                        "shard_06542.parquet"]
    assert "shard_00002.parquet" not in hub.gets()
    m = cd.read_manifest("climbmix")
    assert m["revision"] == SHA_B and m["train_shards"] == 2
    assert m["text_sha256"] == text_sha256(docs[6542] + docs[0] + docs[1])


def test_validation_shard_does_not_depend_on_num_shards_and_same_settings_are_not_redone(cd, hub, capsys):
    repo, commit = "HuggingFaceFW/fineweb-edu", cd.REGISTRY["fineweb-edu"].revision
    for i in range(3):
        hub.publish(repo, f"sample/10BT/{i:03d}_00000.parquet",
                    parquet_bytes({"text": datagen.make_documents(150, seed=10 + i, max_words=40)}), commit)
    val = os.path.join(data(cd, "fineweb-edu"), "shard_06542.parquet")
    assert cd.main(["fineweb-edu", "--num-shards", "1"]) == 0
    first = shard_texts(val)
    assert cd.main(["fineweb-edu", "--num-shards", "3"]) == 0
    assert shard_texts(val) == first and len(os.listdir(data(cd, "fineweb-edu"))) == 4
    n_requests = len(hub.requests)
    capsys.readouterr()
    assert cd.main(["fineweb-edu", "--num-shards", "3"]) == 0
    assert "already prepared" in capsys.readouterr().out and len(hub.requests) == n_requests
    assert cd.main(["fineweb-edu", "--num-shards", "3", "--force"]) == 0
    assert "already prepared" not in capsys.readouterr().out


def test_failed_conversion_leaves_the_prepared_dataset_untouched(cd, hub):
    repo, commit = "HuggingFaceTB/smollm-corpus", cd.REGISTRY["cosmopedia-v2"].revision
    hub.publish(repo, "cosmopedia-v2/train-00000-of-00104.parquet",
                parquet_bytes({"text": datagen.make_documents(250, seed=3, max_words=40),
                               "format": ["textbook"] * 250}), commit)
    assert cd.main(["cosmopedia-v2", "--num-shards", "1"]) == 0
    d = data(cd, "cosmopedia-v2")
    before = {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)}
    with pytest.raises(cd.prepare.PrepareError, match="HTTP 404.*--revision"):
        cd.main(["cosmopedia-v2", "--num-shards", "4"])   # needs the second file, which the server does not have
    assert {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)} == before
    base = os.path.join(cd.prepare.CACHE_DIR, "cosmopedia-v2")
    assert os.path.exists(os.path.join(base, "tokenizer", "tokenizer.pkl"))
    assert not [e for e in os.listdir(base) if e.startswith(".converting")]


def test_missing_column_names_the_columns_and_the_override(cd, hub):
    repo, commit = "HuggingFaceTB/smollm-corpus", cd.REGISTRY["cosmopedia-v2"].revision
    docs = datagen.make_documents(250, seed=4, max_words=40)
    hub.publish(repo, "cosmopedia-v2/train-00000-of-00104.parquet", parquet_bytes({"content": docs}), commit)
    with pytest.raises(cd.prepare.PrepareError, match=r"no column 'text' \(columns: content\).*--column"):
        cd.main(["cosmopedia-v2", "--num-shards", "1"])
    assert cd.main(["cosmopedia-v2", "--num-shards", "1", "--column", "content"]) == 0
    assert shard_texts(os.path.join(data(cd, "cosmopedia-v2"), "shard_06542.parquet")) == docs[:100]


def test_local_text_goes_through_the_same_path(cd, tmp_path):
    src = tmp_path / "notes"
    src.mkdir()
    (src / "a.md").write_text("\n\n".join(datagen.make_documents(40, seed=5, max_words=30)))
    (src / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in datagen.make_documents(60, seed=6)))
    assert cd.main(["--text", str(src), "--name", "mynotes"]) == 0
    info = cd.prepared_info("mynotes")
    assert info["ready"] and info["train_shards"] == 1 and info["val_shard"]

# ---------------------------------------------------------------------------
# Dry run and --list
# ---------------------------------------------------------------------------


def test_dry_run_shows_urls_and_sizes_and_writes_nothing(cd, hub, capsys):
    repo, commit = "HuggingFaceFW/fineweb-edu", cd.REGISTRY["fineweb-edu"].revision
    blob = parquet_bytes({"text": datagen.make_documents(50, seed=1)})
    hub.publish(repo, "sample/10BT/000_00000.parquet", blob, commit)
    assert cd.main(["fineweb-edu", "--dry-run", "--num-shards", "2"]) == 0
    out = capsys.readouterr().out
    assert f"/datasets/{repo}/resolve/{commit}/sample/10BT/000_00000.parquet" in out
    assert "about 1 of 14" in out and cd.human(len(blob)) in out and "nothing is downloaded" in out
    assert hub.requests == [] and not os.path.exists(cd.prepare.CACHE_DIR)   # HEAD only, nothing on disk

    hub.publish("DKYoon/SlimPajama-6B", "default/train/0000.parquet", blob, SHA_A, branch="refs/convert/parquet")
    assert cd.main(["slimpajama", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{SHA_A} (resolved from refs/convert/parquet)" in out and "NOT FOUND" in out   # file 0001 is missing
    assert hub.requests == []


def test_list_shows_the_registry_and_prepared_datasets_with_sizes(cd, hub, capsys):
    hub.publish("roneneldan/TinyStories", "TinyStoriesV2-GPT4-train.txt",
                "\n<|endoftext|>\n".join(datagen.make_documents(220, seed=2, max_words=30)).encode(),
                cd.REGISTRY["tinystories"].revision)
    assert cd.main(["tinystories", "--num-shards", "1"]) == 0
    capsys.readouterr()
    assert cd.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in cd.REGISTRY:
        assert name in out
    assert "not pinned" in out and "87f09149ef47 (pinned)" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("tinystories") and "+val" in ln)
    assert "1+val" in line and "200" in line and "KB" in line and "yes" in line
    assert "Downloaded source files" in out

# ---------------------------------------------------------------------------
# The command line as a user runs it
# ---------------------------------------------------------------------------


def cli(*args, **env):
    full = scrubbed_env(**{"AUTORESEARCH_PROFILE": "cpu", **env})
    return subprocess.run([sys.executable, os.path.join(ROOT, "convert_dataset.py"), *args], capture_output=True,
                          text=True, env=full, timeout=60)


def test_cli_errors_are_one_line(tmp_path):
    cache = str(tmp_path / "cache")
    r = cli("nosuchdata", AUTORESEARCH_CACHE_DIR=cache)
    assert r.returncode == 1 and r.stderr.startswith("error: unknown dataset 'nosuchdata'; choose one of: climbmix")
    assert r.stderr.count("\n") == 1
    r = cli("tinystories", AUTORESEARCH_CACHE_DIR=cache, HF_ENDPOINT="http://127.0.0.1:9")
    assert r.returncode == 1 and "cannot reach http://127.0.0.1:9" in r.stderr and "HF_ENDPOINT" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = cli("fineweb-edu", "--num-shards", "0", AUTORESEARCH_CACHE_DIR=cache)
    assert r.returncode == 2 and "usage:" in r.stderr and "at least 1" in r.stderr
    r = cli(AUTORESEARCH_CACHE_DIR=cache)
    assert r.returncode == 2 and "name a dataset" in r.stderr
    assert not os.path.exists(os.path.join(cache, "tinystories", "data"))


def test_cli_help_lists_every_option():
    r = cli("--help")
    for flag in ("--list", "--dry-run", "--num-shards", "--revision", "--column", "--name", "--workers",
                 "--delete-raw", "--force", "--text", "fineweb-edu-high", "HF_ENDPOINT"):
        assert flag in r.stdout, flag

# ---------------------------------------------------------------------------
# The real trainer on a converted dataset
# ---------------------------------------------------------------------------


@pytest.mark.slow   # ~20 s: a real (tiny) training run with its startup and evaluation
def test_real_trainer_runs_on_a_converted_dataset(tmp_path):
    cache = tmp_path / "cache"
    env = dict(AUTORESEARCH_CACHE_DIR=str(cache), AUTORESEARCH_PROFILE="cpu", AUTORESEARCH_SHARD_ROWS="300",
               AUTORESEARCH_MAX_SEQ_LEN=str(TINY_SEQ_LEN), AUTORESEARCH_EVAL_TOKENS="4096",
               AUTORESEARCH_CPU_PEAK_FLOPS="1e11")
    with Hub() as hub:
        words = [" ".join(d.split()[:12]) for d in datagen.make_documents(1000, seed=9, max_words=30)]
        code = [f"def f{j}(x):\n    return x * {j} + {j % 7}  # {w}" for j, w in enumerate(words)]
        hub.publish("codeparrot/github-code-clean", "Python-all/partial-train/0000.parquet",
                    parquet_bytes({"code": code}), SHA_A, branch="refs/convert/parquet")
        r = cli("github-code-python", "--num-shards", "2", HF_ENDPOINT=hub.endpoint, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    tiny_scripts(tmp_path)
    run = run_script(tmp_path / "train.py", dict(env, AUTORESEARCH_DATASET="github-code-python"),
                     AUTORESEARCH_BACKEND="cpu")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = parse_summary(run.stdout)
    assert 0 < float(summary["val_bpb"]) < 20
    assert "Dataset: github-code-python" in run.stdout
