"""
Training throughput benchmark: for each backend available here, a real `train.py` run (default config, unmodified
script) with a short budget; prints tokens/s, MFU against the measured peak, peak memory and the startup + evaluation
overhead (total_seconds - training_seconds) as a share of the standard 300 s budget.

    uv run benchmarks/throughput.py                          # prepared dataset in the default cache
    uv run benchmarks/throughput.py --corpus ../shared/data/bench-corpus --budget 60 --repeat 2
    uv run benchmarks/throughput.py --backends cpu --set DEPTH=3 --set DEVICE_BATCH_SIZE=16   # a sweep point

Runs one after another (never in parallel: they would share the cores). --set edits a copy of the script's
hyperparameter block, like the agent does; the repository's scripts are never modified.
"""

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND_SCRIPTS = {"cpu": "train.py", "mlx": "train_mlx.py", "cuda": "train.py", "mps": "train.py"}


def available_backends():
    out = []
    code = {"cpu": "import torch", "mlx": "import mlx.core",
            "cuda": "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)",
            "mps": "import torch, sys; sys.exit(0 if torch.backends.mps.is_available() else 1)"}
    for b, c in code.items():
        if subprocess.run([sys.executable, "-c", c], capture_output=True).returncode == 0:
            out.append(b)
    return out


def edit_block(text, settings):
    start = text.index("# Hyperparameters (edit these directly")
    end = text.index("# Setup", start)
    block = text[start:end]
    for name, value in settings:
        block, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", block, flags=re.M)
        if n != 1:
            sys.exit(f"error: {name} is not a line of the hyperparameter block")
    return text[:start] + block + text[end:]


def run(backend, env, budget, settings, workdir):
    script = os.path.join(ROOT, BACKEND_SCRIPTS[backend])
    if settings:
        with open(script) as f:
            text = edit_block(f.read(), settings)
        script = os.path.join(workdir, os.path.basename(script))
        with open(script, "w") as f:
            f.write(text)
    full = dict(os.environ, **env, AUTORESEARCH_TIME_BUDGET=str(budget), AUTORESEARCH_BACKEND=backend,
                PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, script], env=full, capture_output=True, timeout=budget * 3 + 900, cwd=ROOT)
    out = r.stdout.decode(errors="replace")
    if r.returncode != 0 or "\n---\n" not in out:
        tail = (out + r.stderr.decode(errors="replace"))[-1500:]
        sys.exit(f"error: {backend} run failed (exit {r.returncode}):\n{tail}")
    summary = dict(re.findall(r"^(\w+):\s+(.+?)\s*$", out.rsplit("\n---\n", 1)[1], flags=re.M))
    blas = re.search(r"BLAS: ([^)]*)\)", out)
    # steady-state tokens/s from the progress lines of the timed steps (step > 10), weighted by step time
    steps = [(int(s), int(dt), int(tok.replace(",", ""))) for s, dt, tok in
             re.findall(r"step (\d+) .*?dt: (\d+)ms \| tok/sec: ([\d,]+)", out)]
    timed = [(dt, tok) for s, dt, tok in steps if s > 10] or [(dt, tok) for _, dt, tok in steps]
    return dict(
        tok_s=sum(tok * dt for dt, tok in timed) / max(sum(dt for dt, _ in timed), 1),
        mfu=float(summary["mfu_percent"]), mem=float(summary["peak_vram_mb"]),
        overhead=float(summary["total_seconds"]) - float(summary["training_seconds"]),
        val_bpb=float(summary["val_bpb"]), steps=int(summary["num_steps"]), params=summary["num_params_M"],
        depth=summary["depth"], blas=blas.group(1) if blas else "")


def prepare_corpus(corpus, workdir):
    """A climbmix-layout folder prepared as dataset "bench" in a cache under workdir; returns the env that selects it."""
    cache = os.path.join(workdir, "cache")
    data = os.path.join(cache, "bench", "data")
    os.makedirs(data)
    for s in glob.glob(os.path.join(corpus, "shard_*.parquet")):
        shutil.copy(s, data)
    env = dict(AUTORESEARCH_CACHE_DIR=cache, AUTORESEARCH_DATASET="bench")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--name", "bench"],
                       env=dict(os.environ, **env), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: preparing {corpus} failed:\n{r.stdout[-1000:]}{r.stderr[-1000:]}")
    # reuse the machine's measured CPU peak instead of re-measuring in the temporary cache
    hw_cache = os.path.join(os.path.expanduser(os.environ.get("AUTORESEARCH_CACHE_DIR") or
                                               "~/.cache/autoresearch"), "hardware.json")
    if os.path.exists(hw_cache):
        shutil.copy(hw_cache, cache)
    return env


def parse_run_options(ap):
    """--corpus and --set (shared with benchmarks/sealed_eval.py): (args, [(name, value), ...])."""
    ap.add_argument("--corpus", default=None, help="climbmix-layout folder to prepare into a temporary cache")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a hyperparameter in a copy of the script (repeatable)")
    args = ap.parse_args()
    return args, [tuple(s.split("=", 1)) for s in args.set]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=None, help="comma list (default: every backend available here)")
    ap.add_argument("--budget", type=float, default=60, help="training seconds per run (default 60)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per backend (report mean and spread)")
    args, settings = parse_run_options(ap)
    backends = args.backends.split(",") if args.backends else available_backends()

    workdir = tempfile.mkdtemp(prefix="ar-throughput-")
    try:
        env = prepare_corpus(args.corpus, workdir) if args.corpus else {}
        results = {}
        for b in backends:
            results[b] = []
            for i in range(args.repeat):
                print(f"running {b} ({i + 1}/{args.repeat}, budget {args.budget:g}s) ...", flush=True)
                results[b].append(run(b, env, args.budget, settings, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def fmt(values, f):
        return f(statistics.mean(values)) + (f" ±{f(statistics.stdev(values))}" if len(values) > 1 else "")

    print()
    cfg = ", ".join(f"{k}={v}" for k, v in settings) or "defaults"
    print(f"config: {cfg}; budget {args.budget:g}s per run; overhead % is of the standard 300 s budget")
    head = f"{'backend':8} {'tok/s':>14} {'MFU %':>12} {'peak MB':>10} {'overhead s':>12} {'ovh % 300s':>10} " \
           f"{'val_bpb':>9} {'steps':>6}  model / BLAS"
    print(head)
    print("-" * len(head))
    ref = statistics.mean(r["tok_s"] for r in results[backends[0]])
    for b, rs in results.items():
        tok = [r["tok_s"] for r in rs]
        print(f"{b:8} {fmt(tok, lambda v: f'{v:,.0f}'):>14} {fmt([r['mfu'] for r in rs], lambda v: f'{v:.1f}'):>12} "
              f"{fmt([r['mem'] for r in rs], lambda v: f'{v:.0f}'):>10} "
              f"{fmt([r['overhead'] for r in rs], lambda v: f'{v:.1f}'):>12} "
              f"{100 * statistics.mean(r['overhead'] for r in rs) / 300:>10.1f} "
              f"{statistics.mean(r['val_bpb'] for r in rs):>9.4f} {rs[0]['steps']:>6}  "
              f"depth {rs[0]['depth']}, {rs[0]['params']}M{', ' + rs[0]['blas'] if rs[0]['blas'] else ''}")
    if len(results) > 1:
        for b in backends[1:]:
            ratio = statistics.mean(r["tok_s"] for r in results[b]) / ref
            print(f"{b} tokens/s = {100 * ratio:.0f}% of {backends[0]}")


if __name__ == "__main__":
    main()
