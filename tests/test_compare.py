"""compare_datasets.py: the summary table and JSON from real results files, hyperparameters read from a real git
history, the progress chart (confirmed vs single-run keeps) and PNGs for empty, single-row and all-crash results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import compare_datasets as cmp
from fakes.repo import git, make_repo
from tui.results import ResultsFile, Row

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
SCRIPT = """\
import os
# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

DEPTH = 8
MATRIX_LR = 0.04
WINDOW_PATTERN = "SSSL"
TOTAL_BATCH_SIZE = _hp["total_batch_size"]  # sized for this machine

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------
print("training")
"""
NEW_COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description", "exp", "tok_sec", "mfu", "steps", "backend",
               "chip", "dataset", "seconds", "notes", "tag", "llm_tokens", "llm_cost", "seed", "run", "kind"]
OLD_COLUMNS = NEW_COLUMNS[:17]   # before repeated runs (issue 8): no seed/run/kind


def commit_change(repo, branch, old, new, message):
    git(repo, "checkout", "-q", branch)
    path = repo / "train.py"
    path.write_text(path.read_text().replace(old, new))
    git(repo, "commit", "-q", "-am", message)
    return git(repo, "rev-parse", "--short=7", "HEAD").strip()


def write_results(path, columns, rows):
    f = ResultsFile(path, columns)
    f.ensure()
    for r in rows:
        f.append(Row.parse({k: str(v) for k, v in r.items()}))


def row(exp, status, val, desc, commit, dataset, tag, **extra):
    return dict(commit=commit, val_bpb=f"{val:.6f}", memory_gb="1.0", status=status, description=desc,
                exp=f"exp{exp}", dataset=dataset, tag=tag, backend="cpu", **extra)


@pytest.fixture
def suite(tmp_path):
    """Two datasets' agent runs on their own branches of one repo, with results files like run_suite.py's."""
    repo = make_repo(tmp_path / "repo", {"train.py": SCRIPT})
    base = git(repo, "rev-parse", "--short=7", "HEAD").strip()
    git(repo, "branch", "autoresearch/s-alpha")
    git(repo, "branch", "autoresearch/s-beta")
    a1 = commit_change(repo, "autoresearch/s-alpha", "MATRIX_LR = 0.04", "MATRIX_LR = 0.06", "exp1: raise matrix LR")
    a4 = commit_change(repo, "autoresearch/s-alpha", 'WINDOW_PATTERN = "SSSL"', 'WINDOW_PATTERN = "L"',
                       "exp4: full attention")
    b1 = commit_change(repo, "autoresearch/s-beta", "DEPTH = 8", "DEPTH = 4", "exp1: half the depth")
    git(repo, "checkout", "-q", "main")
    results = tmp_path / "results"
    t = "s-alpha"
    write_results(results / "alpha" / "results.tsv", NEW_COLUMNS, [
        row(0, "keep", 1.100, "baseline", base, "alpha", t, run=0, kind="noise"),
        row(0, "keep", 1.102, "baseline", base, "alpha", t, run=1, kind="noise", seed=43),
        row(0, "keep", 1.098, "baseline", base, "alpha", t, run=2, kind="noise", seed=44),
        row(1, "keep", 1.050, "raise matrix LR", a1, "alpha", t, run=0),
        row(1, "keep", 1.052, "raise matrix LR", a1, "alpha", t, run=1, kind="confirm", seed=43),
        row(2, "discard", 1.200, "deeper", "1234567", "alpha", t, run=0),
        row(3, "crash", 0.0, "bigger batch\twith a tab", "-", "alpha", t, run=0, notes="OOM"),
        row(4, "keep", 1.040, "full attention", a4, "alpha", t, run=0),
        row(5, "skip", 0.0, "LLM unavailable", "-", "alpha", t),
    ])
    t = "s-beta"
    write_results(results / "beta" / "results.tsv", OLD_COLUMNS, [
        row(0, "keep", 1.300, "baseline", base, "beta", t),
        row(1, "keep", 1.250, "half the depth", b1, "beta", t),
        row(2, "discard", 1.310, "lower matrix LR", "abcdef0", "beta", t),
    ])
    return repo, results


def run_main(capsys, *args):
    assert cmp.main(list(args)) == 0
    return capsys.readouterr().out


def is_png(path):
    data = Path(path).read_bytes()
    return data[:8] == PNG and len(data) > 5000


def test_summary_json_and_hyperparameters_from_git(suite, capsys):
    repo, results = suite
    doc = json.loads(run_main(capsys, "--results-dir", str(results), "--repo", str(repo), "--json"))
    a, b = doc["datasets"]
    assert (a["dataset"], a["tag"], b["dataset"]) == ("alpha", "s-alpha", "beta")
    assert (a["experiments"], a["training_runs"], a["kept"], a["discarded"], a["crashed"], a["skipped"]) == \
        (5, 8, 3, 1, 1, 1)
    assert a["keep_rate"] == pytest.approx(0.5) and a["crash_rate"] == pytest.approx(0.2)   # keeps after exp0
    assert (a["confirmed_keeps"], a["single_run_keeps"]) == (1, 1)
    assert a["baseline"] == pytest.approx(1.100) and a["baseline_runs"] == 3                 # mean of the noise runs
    assert (a["best"], a["best_exp"], a["best_runs"]) == (pytest.approx(1.040), 4, 1)
    assert a["improvement_pct"] == pytest.approx((1.100 - 1.040) / 1.100 * 100)
    assert (b["best"], b["best_exp"], b["keep_rate"]) == (pytest.approx(1.25), 1, 0.5)
    # the best commit's hyperparameter block, read with git show: alpha kept two changes, beta one
    assert a["hparams"] == {"MATRIX_LR": 0.06, "WINDOW_PATTERN": "L", "DEPTH": 8}
    assert b["hparams"] == {"MATRIX_LR": 0.04, "WINDOW_PATTERN": "SSSL", "DEPTH": 4}
    assert a["hparams_source"].startswith("git show") and a["hparams_source"].endswith(":train.py")
    assert set(doc["hparams"]) == {"MATRIX_LR", "WINDOW_PATTERN", "DEPTH"}
    assert all(row["divergent"] for row in doc["hparams"].values())
    assert "TOTAL_BATCH_SIZE" not in doc["hparams"]                                         # unchanged everywhere
    names = sorted(os.path.basename(c) for c in doc["charts"])
    assert names == ["comparison-hparams.png", "comparison-progress.png", "progress-alpha.png", "progress-beta.png"]
    assert all(is_png(c) for c in doc["charts"])


def test_text_table_side_by_side(suite, capsys):
    repo, results = suite
    out = run_main(capsys, "--results-dir", str(results), "--repo", str(repo), "--no-charts")
    alpha = next(ln for ln in out.splitlines() if ln.startswith("alpha"))
    assert "1.100000" in alpha and "1.040000" in alpha and "+5.45%" in alpha and "exp4: full attention" in alpha
    depth = next(ln for ln in out.splitlines() if ln.strip().startswith("DEPTH"))
    assert depth.split()[1:4] == ["8", "=", "4"] and "differs between datasets" in depth
    assert "wrote" not in out


def test_hyperparameters_fall_back_to_descriptions_without_git(tmp_path, capsys):
    path = tmp_path / "results.tsv"
    write_results(path, OLD_COLUMNS, [
        row(0, "keep", 1.3, "baseline", "aaaaaaa", "local", "t"),
        row(1, "keep", 1.2, "set MATRIX_LR to 0.05", "bbbbbbb", "local", "t"),
        row(2, "keep", 1.1, "DEPTH from 8 to 6", "ccccccc", "local", "t"),
    ])
    doc = json.loads(run_main(capsys, "--results", str(path), "--repo", str(tmp_path), "--json", "--no-charts"))
    s = doc["datasets"][0]
    assert s["hparams"] == {"MATRIX_LR": 0.05, "DEPTH": 6} and s["hparams_source"] == "kept experiments' descriptions"


def test_confirmed_and_single_run_keeps_are_drawn_differently(suite):
    _, results = suite
    run = cmp.load_run(results / "alpha" / "results.tsv")
    fig, ax = cmp._plt().subplots()
    labels = cmp.draw_progress(ax, run, cmp.summarize(run))
    # exp2 (1.2) is far above the baseline: drawn on the top edge so it does not squash the chart
    assert {"kept (one run)", "kept, confirmed (mean of its runs)", "discarded, off the scale", "crash",
            "running best"} <= set(labels)
    xs, ys = cmp.running_best(run.experiments)
    assert xs == [0, 1, 4] and ys == pytest.approx([1.100, 1.051, 1.040])
    texts = [t.get_text() for t in ax.texts]
    assert "baseline" in texts and "raise matrix LR" in texts and "deeper" not in texts   # kept ones are labelled
    cmp._plt().close(fig)

    beta = cmp.load_run(results / "beta" / "results.tsv")        # no run column: every keep is a single run
    fig, ax = cmp._plt().subplots()
    labels = cmp.draw_progress(ax, beta, cmp.summarize(beta))
    assert "kept (one run)" in labels and "kept, confirmed (mean of its runs)" not in labels
    cmp._plt().close(fig)


HEADER = "\t".join(NEW_COLUMNS) + "\n"


@pytest.mark.parametrize("case,content,expect", [
    ("empty", "", "no experiments yet"),
    ("header only", HEADER, "no experiments yet"),
    ("single baseline row", HEADER + "abc1234\t1.234567\t2.0\tkeep\tbaseline\texp0" + "\t" * 14 + "\n", None),
    ("all crash", HEADER + "".join(f"-\t0.000000\t0.0\tcrash\ttry {i}\texp{i}" + "\t" * 14 + "\n" for i in range(3)),
     "all 3 of 3 crashed"),
    ("upstream 5 columns", "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                           "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\nb2c3d4e\t0.993200\t44.2\tkeep\tincrease LR\n"
                           "c3d4e5f\t1.005000\t44.0\tdiscard\tswitch to GeLU\n"
                           "d4e5f6g\t0.000000\t0.0\tcrash\tdouble width\n",
     None),
])
def test_progress_chart_for_any_results_file(tmp_path, capsys, case, content, expect):
    path = tmp_path / "results.tsv"
    path.write_text(content)
    out = run_main(capsys, "--results", str(path))
    assert is_png(tmp_path / "progress.png") and f"wrote {tmp_path / 'progress.png'}" in out
    run = cmp.load_run(path)
    fig, ax = cmp._plt().subplots()
    cmp.draw_progress(ax, run, cmp.summarize(run))
    texts = [t.get_text() for t in ax.texts]
    cmp._plt().close(fig)
    if expect:
        assert any(expect in t for t in texts), texts
    else:
        assert not any("no " in t and "experiment" in t for t in texts)


def test_upstream_file_numbers_experiments_by_row(tmp_path, capsys):
    path = tmp_path / "results.tsv"
    path.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\na\t1.0\t1\tkeep\tbaseline\n"
                    "b\t0.9\t1\tkeep\tbetter\nc\t0.0\t0\tcrash\toom\n")
    s = json.loads(run_main(capsys, "--results", str(path), "--json", "--no-charts"))["datasets"][0]
    assert (s["experiments"], s["best_exp"], s["crashed"], s["baseline"]) == (3, 1, 1, 1.0)


def test_tags_pick_the_latest_run_unless_told(tmp_path, capsys):
    path = tmp_path / "results.tsv"
    write_results(path, OLD_COLUMNS, [row(0, "keep", 1.5, "baseline", "a", "d", "old"),
                                      row(0, "keep", 1.2, "baseline", "b", "d", "new"),
                                      row(1, "keep", 1.1, "better", "c", "d", "new")])
    out = run_main(capsys, "--results", str(path), "--no-charts")
    assert "also has tag(s) old" in out and "1.100000" in out
    s = json.loads(run_main(capsys, "--results", str(path), "--tag", "old", "--json", "--no-charts"))["datasets"][0]
    assert (s["tag"], s["experiments"], s["best"]) == ("old", 1, 1.5)


def test_suite_tag_selects_each_datasets_rows(suite, capsys):
    repo, results = suite
    doc = json.loads(run_main(capsys, "--results-dir", str(results), "--tag", "s", "--json", "--no-charts",
                              "--repo", str(repo)))
    assert [d["tag"] for d in doc["datasets"]] == ["s-alpha", "s-beta"]


def test_cli_writes_the_progress_chart_next_to_the_results(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text(HEADER + "-\t0.000000\t0.0\tcrash\tboom\texp0" + "\t" * 14 + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "compare_datasets.py"), "--results", str(path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert is_png(tmp_path / "progress.png") and "wrote" in r.stdout


def test_missing_results_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "compare_datasets.py"), "--results", str(tmp_path / "nope.tsv")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: no results file") and r.stderr.count("\n") == 1
    r = subprocess.run([sys.executable, str(ROOT / "compare_datasets.py")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and "pass --results FILE" in r.stderr and "Traceback" not in r.stderr
