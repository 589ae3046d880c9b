"""prepare.py: downloads against a real local HF-style server, local import, tokenizer, packing, evaluate_bpb, errors."""

import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import datagen
from hfserver import FakeHub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "karpathy/climbmix-400b-shuffle"


@pytest.fixture
def prep(tmp_path, monkeypatch):
    """prepare.py freshly imported against an empty cache dir in tmp_path."""
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "cpu")
    for var in ("AUTORESEARCH_DATASET", "AUTORESEARCH_EVAL_TOKENS", "AUTORESEARCH_MAX_SEQ_LEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    import prepare
    yield importlib.reload(prepare)
    monkeypatch.undo()
    importlib.reload(prepare)


def run_prepare(args, env_extra, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "HF_"))}
    env.update(env_extra)
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def shard_bytes(tmp_path, i, n_docs=80, seed=0):
    path = tmp_path / "src" / f"shard_{i:05d}.parquet"
    datagen.write_parquet(str(path), datagen.make_documents(n_docs, seed=seed + i))
    return path.read_bytes()


def no_partial_files(directory):
    return [f for f in os.listdir(directory) if f.endswith(".part") or f.startswith(".tmp-")]

# ---------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------

def test_download_survives_faults_and_files_are_byte_identical(prep, tmp_path, monkeypatch):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        sources = {}
        for i in (0, 1, 2, 3, 6542):
            data = shard_bytes(tmp_path, i, n_docs=1500)
            sources[i] = data
            hub.add(REPO, f"shard_{i:05d}.parquet", data)
        hub.faults["shard_00000.parquet"] = ["500", "500"]              # 500 then success
        hub.faults["shard_00001.parquet"] = ["drop", "drop"]            # connection dropped mid-file: resumed
        hub.faults["shard_00002.parquet"] = ["truncate"]                # complete-looking but cut body: re-fetched
        hub.faults["shard_00003.parquet"] = ["drop", "ignore-range"]    # resume refused by server: starts over
        dest = tmp_path / "cache" / "climbmix" / "data"
        prep.download_shards([0, 1, 2, 3, 6542], str(dest), workers=3, backoff=0.01, attempts=5)
        for i, data in sources.items():
            assert (dest / f"shard_{i:05d}.parquet").read_bytes() == data
        assert no_partial_files(dest) == []
        ranged = [r for r in hub.requests if r[0] == "shard_00001.parquet" and r[1]]
        assert ranged and all(status == 206 for _, _, status in ranged), "a dropped download must resume with Range"


def test_download_404_and_giving_up_leave_nothing_behind(prep, tmp_path, monkeypatch):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        hub.add(REPO, "shard_00000.parquet", shard_bytes(tmp_path, 0))
        hub.faults["shard_00000.parquet"] = ["drop"] * 10
        dest = tmp_path / "cache" / "climbmix" / "data"
        with pytest.raises(prep.PrepareError, match="404"):
            prep.download_shards([5], str(dest), workers=1, backoff=0.01, attempts=2)
        with pytest.raises(prep.PrepareError, match="after 3 attempts"):
            prep.download_shards([0], str(dest), workers=1, backoff=0.01, attempts=3)
        assert os.listdir(dest) == []


def test_existing_verified_shards_are_not_downloaded_again(prep, tmp_path, monkeypatch):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        hub.add(REPO, "shard_00000.parquet", shard_bytes(tmp_path, 0))
        dest = tmp_path / "cache" / "climbmix" / "data"
        prep.download_shards([0], str(dest), workers=1, backoff=0.01)
        prep.download_shards([0], str(dest), workers=1, backoff=0.01)
        assert len(hub.requests) == 1


def test_cli_end_to_end_download_then_tokenizer_and_cache(tmp_path):
    with FakeHub() as hub:
        for i in (0, 1, 6542):
            hub.add(REPO, f"shard_{i:05d}.parquet", shard_bytes(tmp_path, i, n_docs=300))
        cache = tmp_path / "cache"
        r = run_prepare(["--num-shards", "2", "--download-workers", "2"],
                        {"HF_ENDPOINT": hub.endpoint, "AUTORESEARCH_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr + r.stdout
    assert "Downloaded 3 shard(s)" in r.stdout, r.stdout
    assert (cache / "climbmix" / "tokenizer" / "tokenizer.pkl").exists()
    assert (cache / "climbmix" / "tokenizer" / "token_bytes.npy").exists()
    assert json.loads((cache / "profile.json").read_text())["profile"] == "cpu"   # recorded at first prepare
    assert "Evaluation profile: cpu" in r.stdout


def test_cli_offline_is_one_clear_line(tmp_path):
    cache = tmp_path / "cache"
    r = run_prepare(["--num-shards", "1"], {"HF_ENDPOINT": "http://127.0.0.1:9", "AUTORESEARCH_CACHE_DIR": str(cache)})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "HF_ENDPOINT" in err[0] and "--text" in err[0]
    data = cache / "climbmix" / "data"
    assert not data.exists() or os.listdir(data) == []

# ---------------------------------------------------------------------------
# Local import
# ---------------------------------------------------------------------------

def test_local_import_of_every_file_type(prep, tmp_path):
    src = tmp_path / "notes"
    (src / "sub").mkdir(parents=True)
    docs = datagen.make_documents(40, seed=3)
    (src / "a.txt").write_text("\n\n".join(d[:300] for d in docs[:10]))
    (src / "b.md").write_text("# Title\n\n" + docs[10])
    (src / "sub" / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[11:30])
                                         + "\nnot json\n" + json.dumps({"other": 1}) + "\n")
    datagen.write_parquet(str(src / "d.parquet"), docs[30:40])
    (src / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 5)
    (src / "empty.txt").write_bytes(b"")
    (src / "ignored.csv").write_text("x,y")
    manifest = prep.import_local_text([str(src)], name="notes")
    assert manifest["files"] == 6
    assert manifest["documents"] == 1 + 1 + 19 + 10 + 1      # a.txt is short enough to stay one document
    train = pq.read_table(prep.list_shards("train", "notes")[0]).column("text").to_pylist()
    val = pq.read_table(prep.list_shards("val", "notes")[0]).column("text").to_pylist()
    assert len(val) >= 1 and len(train) + len(val) == manifest["documents"]
    assert any("\ufffd" in t for t in train + val)            # bad bytes replaced, not fatal
    # deterministic: importing again gives the same split
    prep.import_local_text([str(src)], name="notes")
    assert pq.read_table(prep.list_shards("val", "notes")[0]).column("text").to_pylist() == val


def test_long_text_is_cut_into_documents_at_paragraphs(prep):
    paras = [("word " * 300).strip() for _ in range(20)]   # 20 x ~1500 chars
    docs = prep._split_text("\n\n".join(paras))
    assert len(docs) > 1 and all(len(d) <= prep.LOCAL_DOC_CHARS for d in docs)
    assert sum(d.count("word") for d in docs) == 20 * 300


def test_cli_local_import_trains_tokenizer_and_says_how_to_train(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(datagen.make_documents(200, seed=1)))
    r = run_prepare(["--text", str(src), "--name", "mine"], {"AUTORESEARCH_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr
    assert "AUTORESEARCH_DATASET=mine uv run train.py" in r.stdout


@pytest.mark.parametrize("setup,needle", [
    (lambda d: (d / "empty.txt").write_text(""), "need at least 2"),
    (lambda d: (d / "bad.parquet").write_bytes(b"not parquet at all"), "not a readable parquet"),
    (lambda d: None, "no such file"),
])
def test_cli_local_import_bad_input_is_one_line(tmp_path, setup, needle):
    d = tmp_path / "in"
    d.mkdir()
    setup(d)
    target = str(d / "bad.parquet") if needle == "not a readable parquet" else (
        str(d / "missing.txt") if needle == "no such file" else str(d))
    r = run_prepare(["--text", target], {"AUTORESEARCH_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert needle in r.stderr and r.stderr.strip().count("\n") == 0

# ---------------------------------------------------------------------------
# Tokenizer, token cache, dataloader
# ---------------------------------------------------------------------------

@pytest.fixture
def prepared(prep):
    """A tiny prepared climbmix-layout dataset with a trained tokenizer."""
    datagen.write_climbmix_layout(prep.data_dir(), n_train_shards=2, docs_per_shard=200, n_val_docs=40)
    enc = prep.train_tokenizer()
    tok = prep.Tokenizer(enc, prep.tokenizer_dir())
    return prep, tok


def test_tokenizer_round_trip_and_special_tokens(prepared):
    prep, tok = prepared
    text = "Héllo wörld 123 — 你好 🚀\n\ttabs"
    assert tok.decode(tok.encode(text)) == text
    loaded = prep.Tokenizer.from_directory()
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.get_bos_token_id() == loaded.enc.encode_single_token("<|reserved_0|>")
    assert tok.encode(["a b", "c"], prepend=tok.get_bos_token_id())[1][0] == tok.get_bos_token_id()
    tb = prep.get_token_bytes(loaded)
    assert tb.dtype == np.int32 and len(tb) == loaded.get_vocab_size()
    assert tb[loaded.get_bos_token_id()] == 0 and (tb[:256] == 1).all()


def _segments(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos]
    return [row[s:e] for s, e in zip(starts, starts[1:] + [len(row)])]


def test_packing_invariants_on_random_documents(prep):
    rng = np.random.default_rng(0)
    bos = 0
    docs = [np.concatenate([[bos], rng.integers(1, 100, size=n)]) for n in rng.integers(1, 90, size=3000)]
    doc_set = {tuple(d) for d in docs}
    row_len = 65
    rows = []
    for row, epoch in prep.pack_rows(iter([(d, 1) for d in docs]), row_len, buffer_size=50):
        rows.append(row)
    assert rows, "rows must be produced"
    for row in rows:
        assert len(row) == row_len and row[0] == bos                      # every row starts with BOS, no padding
        segs = _segments(row.tolist(), bos)
        for s in segs[:-1]:
            assert tuple(s) in doc_set                                      # only the last piece may be cropped
        last = tuple(segs[-1])
        assert last in doc_set or any(d[:len(last)] == last for d in doc_set)
    # and each piece is the best fit: the rows are the plainly written rule's, row for row
    assert [r.tolist() for r in rows] == best_fit_rows([d.tolist() for d in docs], row_len, buffer_size=50)


def best_fit_rows(docs, row_len, buffer_size):
    """The packing rule written plainly: keep `buffer_size` documents buffered; fill each row with the longest
    buffered document that fits the room left (of equal lengths the one buffered last) and, when none fits, the
    shortest (of equal lengths the one buffered first) cropped to the room; a finite stream's partial row is dropped.
    (Upstream breaks the first tie the other way, towards the document buffered first.)"""
    stream, buf, rows = iter(docs), [], []
    while True:
        row = []
        while len(row) < row_len:
            while len(buf) < buffer_size and (doc := next(stream, None)) is not None:
                buf.append(doc)
            if not buf:
                return rows
            room = row_len - len(row)
            fits = [i for i, d in enumerate(buf) if len(d) <= room]
            if fits:
                row += buf.pop(max(fits, key=lambda i: (len(buf[i]), i)))
            else:
                row += buf.pop(min(range(len(buf)), key=lambda i: (len(buf[i]), i)))[:room]
        rows.append(row)


def test_packing_takes_the_longest_document_that_fits(prep):
    # lengths 5, 3, 4, 2, 6 (BOS included) into rows of 10: best fit packs 6+4 and 5+3+2; first fit would start 5+3+2
    docs = [[0] + [n] * (n - 1) for n in (5, 3, 4, 2, 6)]
    rows = [r.tolist() for r, _ in prep.pack_rows(iter([(np.array(d), 1) for d in docs]), 10, buffer_size=5)]
    assert rows == [docs[4] + docs[2], docs[0] + docs[1] + docs[3]] == best_fit_rows(docs, 10, 5)


def test_batch_size_does_not_change_the_row_sequence(prepared):
    prep, tok = prepared
    a = next(prep.iter_batches(tok, 4, 32, "train"))[0]
    b = np.concatenate([next(it)[0] for it in [prep.iter_batches(tok, 2, 32, "train")] for _ in range(2)])
    assert (a == b).all()


def test_dataloader_torch_and_mlx_adapters(prepared):
    import mlx.core as mx
    import torch
    prep, tok = prepared
    x, y, epoch = next(prep.make_dataloader(tok, 3, 16, "train"))
    assert x.shape == (3, 16) and x.dtype == torch.int64 and epoch == 1
    assert torch.equal(x[:, 1:], y[:, :-1]) and (x[:, 0] == tok.get_bos_token_id()).all()
    mx_x, mx_y, _ = next(prep.make_dataloader(tok, 3, 16, "train", device="mlx"))
    assert mx_x.shape == (3, 16) and mx_x.dtype == mx.int32
    assert np.array_equal(np.array(mx_x), x.numpy())


def test_epochs_advance_on_a_tiny_training_split(prepared):
    prep, tok = prepared
    epochs = {e for _, (_, _, e) in zip(range(200), prep.make_dataloader(tok, 8, 64, "train"))}
    assert max(epochs) > 1


def test_token_cache_is_refreshed_when_a_shard_changes(prepared):
    prep, tok = prepared
    shard = prep.list_shards("train")[0]
    before, _ = prep.tokenize_shard(tok, shard)
    datagen.write_parquet(shard, ["brand new text"] * 3)
    after, offsets = prep.tokenize_shard(tok, shard)
    assert len(offsets) == 4 and len(after) != len(before)

# ---------------------------------------------------------------------------
# evaluate_bpb
# ---------------------------------------------------------------------------

class UniformTorch:
    """A torch 'model' whose logits are uniform: loss log(V) for every token."""

    def __init__(self, vocab):
        import torch
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.w])

    def __call__(self, x, y, reduction="none"):
        import torch
        logits = torch.zeros(*x.shape, self.vocab)
        return torch.nn.functional.cross_entropy(logits.view(-1, self.vocab), y.reshape(-1),
                                                 reduction="none").view(y.shape)


def test_evaluate_bpb_uniform_model_matches_hand_computation(prepared, monkeypatch):
    prep, tok = prepared
    monkeypatch.setattr(prep, "EVAL_TOKENS", 32 * 20)
    V = tok.get_vocab_size()
    rows = prep.eval_rows(tok, 32)
    tb = prep.get_token_bytes(tok)[rows[:, 1:]]
    expected = math.log2(V) * (tb > 0).sum() / tb.sum()
    got = prep.evaluate_bpb(UniformTorch(V), tok, batch_size=7, seq_len=32)
    assert got == pytest.approx(expected, rel=1e-6)
    # batch size never changes the result
    assert prep.evaluate_bpb(UniformTorch(V), tok, batch_size=3, seq_len=32) == pytest.approx(got, rel=1e-6)


def test_evaluate_bpb_torch_and_mlx_agree(prepared, monkeypatch):
    import mlx.core as mx
    import mlx.nn as mnn
    import torch
    prep, tok = prepared
    monkeypatch.setattr(prep, "EVAL_TOKENS", 32 * 10)
    V, d = tok.get_vocab_size(), 16
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(V, d)).astype(np.float32)
    head = rng.normal(size=(d, V)).astype(np.float32) * 0.1

    class TorchBigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Parameter(torch.from_numpy(emb))
            self.head = torch.nn.Parameter(torch.from_numpy(head))

        def forward(self, x, y, reduction="none"):
            logits = self.emb[x] @ self.head
            return torch.nn.functional.cross_entropy(logits.view(-1, V), y.reshape(-1), reduction=reduction).view(y.shape)

    class MLXBigram(mnn.Module):
        def __init__(self):
            super().__init__()
            self.emb = mx.array(emb)
            self.head = mx.array(head)

        def __call__(self, x, y, reduction="none"):
            logits = self.emb[x] @ self.head
            return mnn.losses.cross_entropy(logits, y, reduction=reduction)

    a = prep.evaluate_bpb(TorchBigram(), tok, 4, seq_len=32)
    b = prep.evaluate_bpb(MLXBigram(), tok, 4, seq_len=32)
    assert a == pytest.approx(b, rel=1e-5) and a > 0


def test_small_validation_split_is_used_whole_not_repeated(prepared, monkeypatch, capsys):
    prep, tok = prepared
    monkeypatch.setattr(prep, "EVAL_TOKENS", 10**9)
    rows = prep.eval_rows(tok, 64)
    val_tokens = len(prep.tokenize_shard(tok, prep.list_shards("val")[0])[0])
    assert 0 < rows.size <= val_tokens + len(rows)
    assert "evaluating on all of it" in capsys.readouterr().out

# ---------------------------------------------------------------------------
# Profiles and one-line errors
# ---------------------------------------------------------------------------

def test_profile_is_recorded_and_env_overrides(prep, monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_PROFILE")
    prep.record_profile("apple")
    prep.record_profile()                        # an existing record is kept
    assert prep.get_profile().name == "apple" and "recorded" in prep.get_profile().source
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "cpu")
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "4096")
    p = prep.get_profile()
    assert (p.name, p.eval_tokens, p.max_seq_len) == ("cpu", 4096, 512)
    assert "AUTORESEARCH_EVAL_TOKENS=4096" in p.describe()
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "tpu")
    with pytest.raises(prep.PrepareError, match="gpu, apple, cpu"):
        prep.get_profile()


def test_profile_follows_the_backend_unless_chosen(prep, monkeypatch):
    """AUTORESEARCH_BACKEND=cpu on a GPU machine evaluates with the cpu profile (512 context, 128K tokens), not the
    2048-context one the GPU's first prepare noted; a profile chosen with --profile applies to every backend."""
    monkeypatch.delenv("AUTORESEARCH_PROFILE")
    prep._atomic_write_bytes(prep.PROFILE_FILE, json.dumps({"profile": "gpu", **prep.PROFILES["gpu"]}).encode())
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "cpu")
    p = prep.get_profile()
    assert (p.name, p.max_seq_len, p.eval_tokens, p.source) == ("cpu", 512, 2**17, "follows the cpu backend")
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "cuda")
    assert prep.get_profile().name == "gpu"
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "mlx")  # MLX on Apple Silicon's GPU, or its CPU build on Linux
    assert prep.get_profile(apple_silicon=True).name == "apple"
    assert prep.get_profile(apple_silicon=False).name == "cpu"
    assert prep.get_profile(backend="mps").name == "apple"
    prep.record_profile("gpu")
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "cpu")
    p = prep.get_profile()
    assert p.name == "gpu" and p.source.startswith("chosen with prepare.py --profile, recorded in ")


SNIPPET = "import prepare; tok = prepare.Tokenizer.from_directory(); next(prepare.make_dataloader(tok, 2, 16, 'train'))"


def _snippet(env, code=SNIPPET):
    full = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)


def test_runtime_errors_are_one_line(tmp_path):
    cache = tmp_path / "cache"
    # unknown dataset
    r = _snippet({"AUTORESEARCH_CACHE_DIR": str(cache), "AUTORESEARCH_DATASET": "nope"})
    assert "Traceback" not in r.stderr and "no tokenizer" in r.stderr
    r = _snippet({"AUTORESEARCH_CACHE_DIR": str(cache), "AUTORESEARCH_DATASET": "nope"},
                 "import prepare; prepare.list_shards('train')")
    assert "Traceback" not in r.stderr and "'nope' is not prepared" in r.stderr
    # only the validation shard present (upstream looped forever)
    data = cache / "climbmix" / "data"
    datagen.write_parquet(str(data / "shard_06542.parquet"), datagen.make_documents(5))
    r = _snippet({"AUTORESEARCH_CACHE_DIR": str(cache)}, "import prepare; prepare.list_shards('train')")
    assert r.returncode != 0 and "only the validation shard" in r.stderr and "Traceback" not in r.stderr
    # corrupt shard
    (data / "shard_00000.parquet").write_bytes(b"garbage")
    r = _snippet({"AUTORESEARCH_CACHE_DIR": str(cache)},
                 "import prepare; list(prepare.iter_shard_texts(prepare.list_shards('train')[0]))")
    assert "not a readable parquet" in r.stderr and "Traceback" not in r.stderr
    # bad dataset name
    r = _snippet({"AUTORESEARCH_CACHE_DIR": str(cache), "AUTORESEARCH_DATASET": "../etc"},
                 "import prepare; prepare.data_dir()")
    assert "invalid dataset name" in r.stderr and "Traceback" not in r.stderr
