"""
Compare agent runs across datasets, and draw the progress chart of any run.

Usage:
    uv run compare_datasets.py                          # every results/<dataset>/results.tsv (from run_suite.py)
    uv run compare_datasets.py --tag mar17              # one suite (tags mar17-<dataset>), or one agent tag
    uv run compare_datasets.py --results results.tsv    # a single run: its progress.png
    uv run compare_datasets.py --json                   # the same summary as JSON, for agents and scripts

Prints a table per dataset (baseline, best, improvement, experiments, keep and crash rates) and the best
configuration's hyperparameters side by side, and writes PNG charts:
    progress.png / progress-<dataset>.png   val_bpb of every experiment, the running best as a step line, kept
                                            experiments labelled (upstream's progress.png); a keep confirmed by
                                            repeated runs is drawn filled with its runs' spread, a single-run keep
                                            hollow; crashes are red crosses on the bottom edge
    comparison-progress.png                 every dataset's running best, raw and relative to its own baseline
    comparison-hparams.png                  the best configuration of each dataset against the baseline

The hyperparameters come from the training script at the best commit (git show, in --repo), else from what the
kept experiments' descriptions say. An experiment is all rows with its exp number (several runs of one commit);
its value is the mean over its runs. Keep rate counts experiments after the baseline.
"""

import argparse
import ast
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tui import results
from tui.results import ResultsFile

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

RESULTS_DIR = "results"
LABEL_CHARS = 48                  # kept experiments' labels on the progress chart
DPI = 120
COLORS = {"keep": "#2ca02c", "discard": "#9a9a9a", "crash": "#d62728", "best": "#1f6f1f"}


class CompareError(RuntimeError):
    """Bad input: printed as one line."""

# ---------------------------------------------------------------------------
# Reading results
# ---------------------------------------------------------------------------


def group_experiments(rows):
    """results.group_experiments, numbered: upstream's files have no exp column, so the row order is the number."""
    exps = results.group_experiments(rows)
    for i, e in enumerate(exps):
        if e.exp is None:
            e.exp = i
    return exps


def confirmed(e) -> bool:
    """Kept on more than one run of the same commit (repeated runs; issue 8's `run` column)."""
    return e.status == "keep" and len(e.values) > 1


def commit_of(e) -> str:
    return "" if e.commit in ("", results.NO_COMMIT) else e.commit


@dataclass
class Run:
    label: str
    path: Path
    tag: str
    rows: list
    other_tags: list = field(default_factory=list)

    @property
    def experiments(self):
        return [e for e in group_experiments(self.rows) if e.status != "skip"]


def _dataset_of(rows, path):
    """The dataset column, else the directory of results/<dataset>/results.tsv, else a generic name."""
    names = [r.dataset for r in rows if r.dataset]
    if names:
        return max(set(names), key=names.count)
    path = path.resolve()
    return path.parent.name if path.parent.parent.name == RESULTS_DIR else "autoresearch"


def load_run(path, tag=None):
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"no results file {path}: run the agent first (uv run dashboard.py --agent --headless), "
                           f"or pass --results FILE")
    try:
        rows = ResultsFile(path).load()
    except OSError as e:
        raise CompareError(f"cannot read {path}: {e.strerror}") from None
    tags = []
    for r in rows:
        if r.tag and r.tag in tags:
            tags.remove(r.tag)
        if r.tag:
            tags.append(r.tag)             # ordered by last appearance
    if tag:
        chosen = [t for t in tags if t == tag or any(t == f"{tag}-{r.dataset}" for r in rows
                                                     if r.tag == t)]
    else:
        chosen = tags[-1:]                    # the most recent run
    picked = [r for r in rows if not r.tag or r.tag in chosen]
    return Run(_dataset_of(picked or rows, path), path, ", ".join(chosen), picked,
               [t for t in tags if t not in chosen])


def find_results(results_dir):
    d = Path(results_dir)
    files = sorted(d.glob("*/results.tsv")) if d.is_dir() else []
    if not files:
        if Path("results.tsv").is_file():
            return [Path("results.tsv")]
        raise CompareError(f"no results in {d}/<dataset>/results.tsv (run_suite.py writes them) and no ./results.tsv: "
                           f"pass --results FILE")
    return files

# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def summarize(run):
    exps = run.experiments
    scored = [e for e in exps if e.mean is not None]
    kept = [e for e in exps if e.status == "keep"]
    after = [e for e in exps if e.exp != 0]
    base = next((e for e in exps if e.exp == 0), None)
    baseline = base.mean if base else None
    best = min((e for e in kept if e.mean is not None), key=lambda e: e.mean, default=None)
    first = best.first if best else None
    s = dict(
        dataset=run.label, tag=run.tag, results=str(run.path),
        experiments=len(exps), training_runs=sum(len(e.rows) for e in exps),
        kept=len(kept), discarded=sum(e.status == "discard" for e in exps),
        crashed=sum(e.status == "crash" for e in exps),
        skipped=sum(e.status == "skip" for e in group_experiments(run.rows)),
        keep_rate=(sum(e.status == "keep" for e in after) / len(after)) if after else None,
        crash_rate=(sum(e.status == "crash" for e in exps) / len(exps)) if exps else None,
        confirmed_keeps=sum(confirmed(e) for e in after), single_run_keeps=sum(e.status == "keep" and not confirmed(e)
                                                                              for e in after),
        baseline=baseline, baseline_runs=len(base.values) if base else 0,
        best=best.mean if best else None, best_exp=best.exp if best else None,
        best_runs=len(best.values) if best else 0, best_description=best.description if best else None,
        best_commit=commit_of(best) if best else None,
        best_memory_gb=first.memory_gb if first else None, best_tok_sec=first.tok_sec if first else None,
        improvement_pct=((baseline - best.mean) / baseline * 100) if (best and baseline) else None,
        scored=len(scored), other_tags=run.other_tags,
    )
    return s

# ---------------------------------------------------------------------------
# Hyperparameters of the best configuration
# ---------------------------------------------------------------------------


def parse_block(source):
    """NAME -> value (a Python literal when it is one, else the expression's text) from the hyperparameter block."""
    from tui.prompt import ScriptError, find_hparams
    try:
        body = find_hparams(source).body
    except ScriptError:
        return {}
    try:
        tree = ast.parse(body)
    except SyntaxError:
        return {}
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, SyntaxError, TypeError):
                out[node.targets[0].id] = ast.get_source_segment(body, node.value)
    return out


def _script_of(git, run):
    """The training script the experiments edited (the one .py file an experiment commit changes)."""
    for e in run.experiments:
        if e.exp and commit_of(e):
            try:
                changed = git.run("show", "--name-only", "--format=", commit_of(e)).split()
            except Exception:
                continue
            py = [f for f in changed if f.endswith(".py")]
            if len(py) == 1:
                return py[0]
    backends = [r.backend for r in run.rows if r.backend]
    return "train_mlx.py" if backends and backends[-1] == "mlx" else "train.py"


def _from_descriptions(run):
    """What kept experiments say they set (NAME = v, NAME to v, NAME from a to v): the fallback without git."""
    out = {}
    for e in run.experiments:
        if e.status != "keep" or not e.exp:
            continue
        for m in re.finditer(r"\b([A-Z][A-Z0-9_]{2,})\b(?:\s+from\s+\S+)?\s*(?:=|:|->|→|\bto\b)\s*"
                             r"([-+]?[\w.]+(?:e[-+]?\d+)?|\"[^\"]*\"|'[^']*'|\([^)]*\))", e.description):
            try:
                out[m.group(1)] = ast.literal_eval(m.group(2))
            except (ValueError, SyntaxError):
                out[m.group(1)] = m.group(2)
    return out


def hyperparameters(run, summary, repo):
    """(baseline block, best block, where they came from)."""
    from tui.git_repo import GitRepo
    git = GitRepo(repo)
    exps = {e.exp: e for e in run.experiments}
    base_commit = commit_of(exps[0]) if 0 in exps else ""
    best_commit = summary["best_commit"] or ""
    if git.is_repo() and base_commit and best_commit:
        script = _script_of(git, run)
        try:
            base = parse_block(git.show(base_commit, script).decode("utf-8", "replace"))
            best = parse_block(git.show(best_commit, script).decode("utf-8", "replace"))
            if base or best:
                return base, best, f"git show {best_commit}:{script}"
        except Exception:
            pass
    said = _from_descriptions(run)
    return {}, said, "kept experiments' descriptions" if said else "none"


def _fmt_value(v):
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text if len(text) <= 20 else text[:19] + "…"


def _numeric(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def compare_hparams(summaries, blocks):
    """Rows of the side-by-side table: names changed from the baseline in at least one dataset."""
    names = []
    for label, (base, best, _) in blocks.items():
        for k, v in best.items():
            if (k not in base or base[k] != v) and k not in names:
                names.append(k)
    baselines = {label: base for label, (base, _, _) in blocks.items()}
    table = {}
    for k in names:
        row = {"baseline": {label: baselines[label].get(k) for label in blocks if k in baselines[label]},
               "best": {label: best.get(k, baselines[label].get(k)) for label, (_, best, _) in blocks.items()
                        if k in best or k in baselines[label]}}
        values = [json.dumps(v, default=str) for v in row["best"].values()]
        row["divergent"] = len(set(values)) > 1
        table[k] = row
    return table

# ---------------------------------------------------------------------------
# Charts (matplotlib, Agg: no display needed)
# ---------------------------------------------------------------------------


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    """Write the PNG atomically: a temp file in the same directory, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        _plt().close(fig)
    return str(path)


def _int_ticks():
    from matplotlib.ticker import MaxNLocator
    return MaxNLocator(integer=True)


def _note(ax, text):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=12, color="#555555",
            bbox=dict(boxstyle="round", facecolor="#f4f4f4", edgecolor="#cccccc"))


def running_best(exps):
    """(exp numbers, best so far) at every kept experiment, in experiment order."""
    xs, ys, best = [], [], None
    for e in sorted(exps, key=lambda e: e.exp):
        if e.status == "keep" and e.mean is not None and (best is None or e.mean < best):
            best = e.mean
            xs.append(e.exp)
            ys.append(best)
    return xs, ys


def progress_chart(run, summary, path):
    fig, ax = _plt().subplots(figsize=(12, 6))
    draw_progress(ax, run, summary)
    fig.tight_layout()
    return _save(fig, path)


def draw_progress(ax, run, summary):
    """Upstream's progress chart on `ax`; returns the legend's labels."""
    exps = run.experiments
    scored = [e for e in exps if e.mean is not None]
    crashes = [e for e in exps if e.status == "crash"]
    title = f"{run.label}: {len(exps)} experiments, {summary['kept']} kept"
    if summary["best"] is not None:
        title += f", best {summary['best']:.6f}"
        if summary["improvement_pct"] is not None:
            title += f" ({summary['improvement_pct']:+.2f}% vs baseline)"
    ax.set_title(title + (f"  [{run.tag}]" if run.tag else ""))
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(alpha=0.3)
    if not scored:
        ax.set_yticks([])          # no value to put on the axis
        _note(ax, "no experiments yet" if not exps else f"no scored experiment: all {len(crashes)} of {len(exps)} "
                  f"crashed" if len(crashes) == len(exps) else "no scored experiment yet")
    values = [v for e in scored for v in e.values]
    if values:
        lo, hi = min(values), max(values)
        if summary["baseline"] is not None:     # discards far above the baseline would squash the interesting part
            hi = min(hi, summary["baseline"] + max(summary["baseline"] - lo, 0.02 * summary["baseline"]))
        pad = max((hi - lo) * 0.08, 1e-3 * max(abs(hi), 1.0))
        ax.set_ylim(lo - pad, hi + pad * 3)
        top = hi + pad * 2.5

        def y(v):
            return min(v, top)

        disc = [e for e in scored if e.status != "keep" and e.mean <= top]
        clipped = [e for e in scored if e.status != "keep" and e.mean > top]
        if disc:
            ax.scatter([e.exp for e in disc], [e.mean for e in disc], s=18, color=COLORS["discard"], alpha=0.7,
                       label="discarded", zorder=2)
        if clipped:
            ax.scatter([e.exp for e in clipped], [top] * len(clipped), marker="^", s=30, color=COLORS["discard"],
                       zorder=2, label="discarded, off the scale")
        kept = [e for e in scored if e.status == "keep"]
        single = [e for e in kept if not confirmed(e)]
        sure = [e for e in kept if confirmed(e)]
        if single:
            ax.scatter([e.exp for e in single], [y(e.mean) for e in single], s=60, facecolors="white",
                       edgecolors=COLORS["keep"], linewidths=1.8, label="kept (one run)", zorder=4)
        if sure:
            for e in sure:
                ax.vlines(e.exp, y(min(e.values)), y(max(e.values)), color=COLORS["keep"], linewidth=1, zorder=3)
                ax.scatter([e.exp] * len(e.values), [y(v) for v in e.values], s=8, color=COLORS["keep"], zorder=3)
            ax.scatter([e.exp for e in sure], [y(e.mean) for e in sure], s=60, color=COLORS["keep"],
                       edgecolors="black", linewidths=0.8, label="kept, confirmed (mean of its runs)", zorder=4)
        xs, ys = running_best(exps)
        if xs:
            last = max(e.exp for e in exps)
            ax.step(xs + [last], ys + [ys[-1]], where="post", color=COLORS["best"], linewidth=1.5,
                    label="running best", zorder=3)
        for e in kept:
            text = "baseline" if e.exp == 0 else e.description
            text = text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"
            ax.annotate(text, (e.exp, y(e.mean)), xytext=(4, 6), textcoords="offset points", fontsize=7,
                        rotation=25, color="#1a4d1a", zorder=5)
    if crashes:
        ax.scatter([e.exp for e in crashes], [0.02] * len(crashes), transform=ax.get_xaxis_transform(), marker="x",
                   s=30, color=COLORS["crash"], label="crash", zorder=4)
    if exps:
        ax.set_xlim(-0.5, max(e.exp for e in exps) + 1.5)
    ax.xaxis.set_major_locator(_int_ticks())
    labels = ax.get_legend_handles_labels()[1]
    if labels:
        ax.legend(loc="upper right", fontsize=8)
    return labels


def overlay_chart(runs, summaries, path):
    plt = _plt()
    fig, (raw, rel) = plt.subplots(1, 2, figsize=(14, 5.5))
    raw.set_title("running best val_bpb")
    rel.set_title("improvement over each dataset's own baseline")
    raw.set_ylabel("val_bpb")
    rel.set_ylabel("% better than baseline")
    drawn = 0
    for run, s in zip(runs, summaries):
        exps = run.experiments
        xs, ys = running_best(exps)
        if not xs:
            continue
        last = max(e.exp for e in exps)
        line = raw.step(xs + [last], ys + [ys[-1]], where="post", label=run.label, linewidth=1.6)[0]
        if s["baseline"]:
            pct = [(s["baseline"] - v) / s["baseline"] * 100 for v in ys]
            rel.step(xs + [last], pct + [pct[-1]], where="post", label=run.label, color=line.get_color(),
                     linewidth=1.6)
        drawn += 1
    for ax in (raw, rel):
        ax.xaxis.set_major_locator(_int_ticks())
        ax.set_xlabel("experiment")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            _note(ax, "no data: no kept experiment with a val_bpb yet")
    fig.tight_layout()
    return _save(fig, path)


def hparams_chart(table, blocks, path):
    plt = _plt()
    import numpy as np
    labels = list(blocks)
    names = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(labels) + 3), max(3, 0.45 * len(names) + 1.8)))
    ax.set_title("best configuration per dataset (colour: best / baseline)")
    if not names:
        ax.set_axis_off()
        _note(ax, "no hyperparameter data: no kept change from the baseline (or no git history to read it from)")
        fig.tight_layout()
        return _save(fig, path)
    grid = np.full((len(names), len(labels)), np.nan)
    for i, k in enumerate(names):
        for j, label in enumerate(labels):
            base, best = table[k]["baseline"].get(label), table[k]["best"].get(label)
            if _numeric(base) and _numeric(best) and base != 0 and best / base > 0:
                grid[i, j] = math.log2(best / base)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
    ax.set_facecolor("#eeeeee")
    for i, k in enumerate(names):
        for j, label in enumerate(labels):
            if label not in table[k]["best"]:
                continue
            best, base = table[k]["best"][label], table[k]["baseline"].get(label)
            text = "=" if best == base else _fmt_value(best)
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_yticks(range(len(names)), [f"{k} *" if table[k]["divergent"] else k for k in names])
    cbar = fig.colorbar(im, ax=ax, fraction=0.04)
    cbar.set_ticks([-2, -1, 0, 1, 2], labels=["¼×", "½×", "1×", "2×", "4×"])
    ax.set_xlabel("* = the datasets' best values differ")
    fig.tight_layout()
    return _save(fig, path)

# ---------------------------------------------------------------------------
# Text output
# ---------------------------------------------------------------------------


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def print_table(summaries, table, blocks):
    print(f"{'dataset':<20} {'exps':>5} {'runs':>5} {'kept':>5} {'keep%':>6} {'crash%':>7} {'baseline':>10} "
          f"{'best':>10} {'improv':>8}  best experiment")
    for s in summaries:
        keep = "-" if s["keep_rate"] is None else f"{100 * s['keep_rate']:.1f}"
        crash = "-" if s["crash_rate"] is None else f"{100 * s['crash_rate']:.1f}"
        best = "-" if s["best_exp"] is None else (
            f"exp{s['best_exp']}: {s['best_description']}" + (f" ({s['best_runs']} runs)" if s["best_runs"] > 1
                                                              else ""))
        print(f"{s['dataset']:<20} {s['experiments']:>5} {s['training_runs']:>5} {s['kept']:>5} {keep:>6} {crash:>7} "
              f"{_f(s['baseline'], '.6f'):>10} {_f(s['best'], '.6f'):>10} {_f(s['improvement_pct'], '+.2f'):>7}%  "
              f"{best[:70]}")
    for s in summaries:
        if s["other_tags"]:
            print(f"note: {s['results']} also has tag(s) {', '.join(s['other_tags'])}; pick one with --tag")
    if not blocks:
        return
    labels = list(blocks)
    print(f"\nbest configuration vs baseline ({'; '.join(f'{k}: {v[2]}' for k, v in blocks.items())}):")
    if not table:
        print("  no hyperparameter changed from the baseline in any kept experiment")
        return
    width = max(12, *(len(label) for label in labels))
    print(f"  {'hyperparameter':<22} {'baseline':>{width}} " + " ".join(f"{label:>{width}}" for label in labels))
    for k, row in table.items():
        base_vals = {json.dumps(v, default=str) for v in row["baseline"].values()}
        base = _fmt_value(next(iter(row["baseline"].values()))) if len(base_vals) == 1 else "differs"
        cells = [("=" if row["best"].get(label) == row["baseline"].get(label) and label in row["best"]
                  else _fmt_value(row["best"][label]) if label in row["best"] else "?") for label in labels]
        print(f"  {k:<22} {base:>{width}} " + " ".join(f"{c:>{width}}" for c in cells)
              + ("   * differs between datasets" if row["divergent"] else ""))

# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _safe(label):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label) or "run"


def main(argv=None):
    p = argparse.ArgumentParser(prog="compare_datasets.py", description=__doc__.strip().splitlines()[0],
                                epilog="\n".join(__doc__.strip().splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", action="append", metavar="FILE",
                   help="a results.tsv to read (repeat for several); default: every results/<dataset>/results.tsv")
    p.add_argument("--results-dir", default=RESULTS_DIR, metavar="DIR",
                   help="where run_suite.py writes (default results)")
    p.add_argument("--tag", default=None,
                   help="only this run: rows tagged TAG or TAG-<dataset> (default: each file's most recent tag)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the PNGs go (default: next to --results, or the results directory)")
    p.add_argument("--repo", default=".", metavar="DIR",
                   help="git repository to read the best commits from (default .)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    p.add_argument("--no-charts", action="store_true", help="print the summary only")
    args = p.parse_args(argv)

    files = [Path(f) for f in args.results] if args.results else find_results(args.results_dir)
    runs = [load_run(f, args.tag) for f in files]
    if not args.results and args.tag:
        skipped = [r for r in runs if not r.rows]
        runs = [r for r in runs if r.rows]
        for r in skipped:
            print(f"note: {r.path} has no rows for tag {args.tag!r}", file=sys.stderr)
        if not runs:
            raise CompareError(f"no results for tag {args.tag!r} in {args.results_dir}/*/results.tsv")
    seen = {}
    for r in runs:                                  # two runs of one dataset: tell them apart by tag
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({r.tag or r.path.parent.name})"
    summaries = [summarize(r) for r in runs]
    blocks = {}
    for r, s in zip(runs, summaries):
        if s["best_exp"] is not None:
            blocks[r.label] = hyperparameters(r, s, args.repo)
    table = compare_hparams(summaries, blocks)
    for s in summaries:
        base, best, source = blocks.get(s["dataset"], ({}, {}, "none"))
        s["hparams"] = {k: v for k, v in best.items() if k in table} if table else {}
        s["hparams_source"] = source

    charts = []
    if not args.no_charts:
        out = Path(args.out) if args.out else (files[0].parent if args.results else Path(args.results_dir))
        if len(runs) == 1:
            charts.append(progress_chart(runs[0], summaries[0], out / "progress.png"))
        else:
            for r, s in zip(runs, summaries):
                charts.append(progress_chart(r, s, out / f"progress-{_safe(r.label)}.png"))
        if len(runs) > 1:
            charts.append(overlay_chart(runs, summaries, out / "comparison-progress.png"))
            charts.append(hparams_chart(table, blocks, out / "comparison-hparams.png"))

    if args.json:
        doc = dict(datasets=summaries, hparams={k: dict(v) for k, v in table.items()}, charts=charts)
        print(json.dumps(doc, indent=1, default=str))
    else:
        print_table(summaries, table, blocks)
        for c in charts:
            print(f"wrote {c}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
