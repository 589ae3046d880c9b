"""
Noise-floor simulation: how often does each keep rule keep a change that does nothing?

    uv run benchmarks/noise_sim.py                                 # 30 null experiments per rule (~15 min, 2 cores)
    uv run benchmarks/noise_sim.py --experiments 20 --budget 2 --modes confirm
    uv run benchmarks/noise_sim.py --out sim.json                  # also write the figures as JSON

The agent loop runs for real (tui.orchestrator, git, results.tsv) in a temporary repository built from this checkout,
with the REAL train.py training a tiny model (DEPTH 2, width 64, 8 x 64-token rows per step) on a small generated
dataset prepared with `prepare.py --text`. A fake LLM server (tests/fakes) answers every prompt with a null change:
the current hyperparameter block plus an unused constant `NULL_EDIT = n`, which changes nothing about training. So
every keep is a false keep. Rule "single" runs with one baseline run (the seed's and upstream's behaviour, unless
--single-noise-runs says otherwise); rule "confirm" with its defaults (3 noise runs, up to 2 confirmation runs).
Writes only into a temporary directory (or --work DIR, kept).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

TINY_BLOCK = dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=32, DEVICE_BATCH_SIZE=8, TOTAL_BATCH_SIZE=8 * 64)
SEQ_LEN = 64
EVAL_TOKENS = 8192
CORPUS_DOCS = 6000  # 2 % are held out for validation: ~120 documents, ~8K tokens
FAKE_KEY = "sk-ant-api03-NOISESIM-0000000000000000"
MODEL = "claude-sonnet-4-6"

# ---------------------------------------------------------------------------
# Setup: data, repository, fake LLM
# ---------------------------------------------------------------------------


def prepare_dataset(work: Path) -> dict:
    """A small generated corpus through the real `prepare.py --text`; returns the trainer environment."""
    import datagen
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    docs = datagen.make_documents(CORPUS_DOCS, seed=7, max_words=120)
    (corpus / "corpus.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    env = dict(AUTORESEARCH_CACHE_DIR=str(work / "cache"), AUTORESEARCH_DATASET="tiny", AUTORESEARCH_PROFILE="cpu",
               AUTORESEARCH_MAX_SEQ_LEN=str(SEQ_LEN), AUTORESEARCH_EVAL_TOKENS=str(EVAL_TOKENS),
               AUTORESEARCH_CPU_PEAK_FLOPS="1e11")
    full = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--text", str(corpus), "--name", "tiny"],
                       env={**full, **env}, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        sys.exit(f"error: prepare.py --text failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return env


def make_repo(path: Path) -> Path:
    """A temp git repo with this checkout's trainers and protected files, train.py shrunk to the tiny model."""
    from fakes.repo import git, project_repo
    from trainer_fixtures import edit_hparams
    repo = project_repo(path)
    train = repo / "train.py"
    train.write_text(edit_hparams(train.read_text(), **TINY_BLOCK))
    git(repo, "commit", "-qam", "tiny model for the noise simulation")
    return repo


def null_change_server(repo: Path):
    """A fake Anthropic server that always proposes the current block plus NULL_EDIT = <n>: a change that does
    nothing (an edit of comments only would be refused by the prompt layer)."""
    from fakes.llm_servers import FakeLLMServer
    from tui.prompt import find_hparams
    server = FakeLLMServer("anthropic").start()

    def answer(body):
        n = len(server.chat_requests())
        block = find_hparams((repo / "train.py").read_text()).body
        block = re.sub(r"^NULL_EDIT = .*\n", "", block, flags=re.M).rstrip("\n")
        text = (f"DESCRIPTION: null change {n} (an unused constant)\n"
                f"REASONING: Does nothing; measures how often noise is mistaken for progress.\n"
                f"CODE:\n```python\n{block}\nNULL_EDIT = {n}\n```\n")
        return server.text(text, 1000, 100)

    server.default_chat = answer
    return server


# ---------------------------------------------------------------------------
# One rule
# ---------------------------------------------------------------------------


class Progress:
    """One line per finished run, flushed (the simulation runs in the background)."""

    def __init__(self, mode):
        self.mode = mode

    def on_experiment_end(self, r):
        print(f"[{time.strftime('%H:%M:%S')}] {self.mode:<8} exp{r.exp:<3} run {r.run} {r.status:<8} "
              f"val_bpb {r.val_bpb if r.val_bpb is None else f'{r.val_bpb:.6f}'} | {r.notes[:110]}", flush=True)

    def on_log(self, level, message):
        if level != "info" or message.startswith(("noise floor", "plateau")):
            print(f"[{time.strftime('%H:%M:%S')}] {self.mode:<8} {level}: {message[:200]}", flush=True)


def run_mode(mode: str, experiments: int, work: Path, env: dict, budget: float, noise_runs: int,
             threads: int = 1, listeners=()) -> dict:
    """Run `experiments` null experiments after the baseline under one keep rule; return the figures."""
    from tui.config import AgentConfig
    from tui.decision import noise_floor
    from tui.orchestrator import Orchestrator
    from tui.results import ResultsFile, group_experiments, summarize

    repo = make_repo(work / f"repo-{mode}")
    os.environ.update(env, AUTORESEARCH_TIME_BUDGET=str(budget), ANTHROPIC_API_KEY=FAKE_KEY,
                      OMP_NUM_THREADS=str(threads))
    server = null_change_server(repo)
    cfg = AgentConfig(repo=repo, tag=f"sim-{mode}", max_experiments=1 + experiments, provider="anthropic",
                      model=MODEL, base_url=server.base_url, script="train.py", keep_rule=mode, noise_runs=noise_runs,
                      time_budget=budget, timeout=budget + 300, dataset="tiny", llm_attempts=3,
                      hardware={"chip_name": "CPU (noise simulation)", "kind": "cpu"})
    load0 = os.getloadavg()
    t0 = time.monotonic()
    try:
        summary = Orchestrator(cfg, [Progress(mode), *listeners]).run()
    finally:
        server.stop()
    wall = time.monotonic() - t0
    rows = ResultsFile(repo / "results.tsv").load()
    nulls = [e for e in group_experiments(rows) if e.exp and e.status in ("keep", "discard")]
    values = [v for e in group_experiments(rows) for v in e.values]
    steps = [r.steps for r in rows if r.steps is not None and r.status != "crash"]
    nf = noise_floor(rows)
    return {
        "mode": mode, "ok": summary.ok, "reason": summary.reason, "repo": str(repo),
        "null_experiments": len(nulls), "false_keeps": sum(e.status == "keep" for e in nulls),
        "crashed": summarize(rows).crashed, "training_runs": len(rows),
        "runs_per_null": (sum(len(e.rows) for e in nulls) / len(nulls)) if nulls else 0.0,
        "noise_sigma": nf.used if nf else None,
        "all_runs_sd": statistics.stdev(values) if len(values) > 1 else None,
        "all_runs_mean": statistics.mean(values) if values else None,
        "steps_min": min(steps) if steps else None, "steps_max": max(steps) if steps else None,
        "wall_s": wall, "load_before": load0, "load_after": os.getloadavg(),
    }


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def table(results: list) -> str:
    head = (f"{'rule':<8} {'null exps':>9} {'false keeps':>11} {'rate':>6} {'train runs':>10} {'runs/exp':>8} "
            f"{'σ floor':>8} {'sd all':>8} {'steps':>9} {'wall':>7} {'load 1m':>11}")
    out = [head, "-" * len(head)]
    for r in results:
        n = r["null_experiments"]
        rate = f"{100 * r['false_keeps'] / n:.1f}%" if n else "-"
        sig = "-" if r["noise_sigma"] is None else f"{r['noise_sigma']:.5f}"
        sd = "-" if r["all_runs_sd"] is None else f"{r['all_runs_sd']:.5f}"
        out.append(f"{r['mode']:<8} {n:>9} {r['false_keeps']:>11} {rate:>6} {r['training_runs']:>10} "
                   f"{r['runs_per_null']:>8.2f} {sig:>8} {sd:>8} {r['steps_min']}-{r['steps_max']:<5} "
                   f"{r['wall_s'] / 60:>5.1f} m {r['load_before'][0]:>4.2f}-{r['load_after'][0]:<4.2f}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", type=int, default=30, help="null experiments per rule (default 30)")
    ap.add_argument("--budget", type=float, default=3.0, help="training seconds per run (default 3)")
    ap.add_argument("--modes", default="single,confirm", help="rules to simulate, in order (default single,confirm)")
    ap.add_argument("--single-noise-runs", type=int, default=1,
                    help="baseline runs for rule single (default 1: the seed's behaviour)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: the cores are shared)")
    ap.add_argument("--work", default=None, help="working directory to keep (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("single", "confirm")]
    if bad or args.experiments < 1 or args.budget <= 0:
        ap.error(f"--modes takes single and/or confirm (got {', '.join(bad)})" if bad else
                 "--experiments must be at least 1 and --budget positive")

    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="ar-noise-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"noise simulation: {args.experiments} null experiments per rule ({', '.join(modes)}), budget "
          f"{args.budget:g}s, {args.threads} torch thread(s), {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
          f"work dir {work}", flush=True)
    try:
        env = prepare_dataset(work)
        results = []
        for mode in modes:
            noise_runs = args.single_noise_runs if mode == "single" else 3
            results.append(run_mode(mode, args.experiments, work, env, args.budget, noise_runs, args.threads))
            print(table(results[-1:]), flush=True)
        print()
        print(f"false keeps of null changes (every keep is false), total {(time.monotonic() - t0) / 60:.1f} min:")
        print(table(results))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
