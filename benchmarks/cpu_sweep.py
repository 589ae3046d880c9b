"""
CPU default sweep: val_bpb of the unmodified train.py (hyperparameter block edited like the agent does) for a set of
configs on one or more prepared datasets, interleaved (config-major, datasets inside) so load drift hits all alike,
with today's default repeated first and last to show the drift. Every run records /proc/loadavg before and after.

    uv run benchmarks/cpu_sweep.py --datasets bench,manpages --budget 60            # screening
    uv run benchmarks/cpu_sweep.py --datasets bench,manpages --budget 300 --configs default,d2   # confirmation
    uv run benchmarks/cpu_sweep.py --list                                            # the configs

Datasets must be prepared in AUTORESEARCH_CACHE_DIR (prepare.py --name / convert_dataset.py --text). Rows are
appended to --out (markdown) as each run ends, so a partial sweep keeps its results. The CPU default is chosen by
val_bpb at the 300 s budget only; tokens/s and steps are reported, never a criterion. Table: benchmarks/cpu_sweep.md.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from throughput import edit_block  # noqa: E402

# name: hyperparameter settings over the CPU default this sweep started from ("default": depth 3, ASPECT_RATIO 64 ->
# width 256, "SSSL", device batch 8 x 512, total 4,096 tokens), all spelled out so the names keep their meaning when
# the tier changes (it is now d2-L). Width = depth x ASPECT_RATIO rounded up to HEAD_DIM (128).
OLD_DEFAULT = dict(DEPTH=3, ASPECT_RATIO=64, WINDOW_PATTERN='"SSSL"', DEVICE_BATCH_SIZE=8, TOTAL_BATCH_SIZE=4096)
CONFIGS = {
    "default": {},
    "d2": dict(DEPTH=2),                                    # width 128, 1 head
    "d2-ar128": dict(DEPTH=2, ASPECT_RATIO=128),            # width 256, 2 heads
    "d2-L": dict(DEPTH=2, WINDOW_PATTERN='"L"'),
    "d3-L": dict(WINDOW_PATTERN='"L"'),
    "d3-ar32": dict(ASPECT_RATIO=32),                       # width 128
    "d4": dict(DEPTH=4),                                    # width 256
    "d2-b4-2k": dict(DEPTH=2, DEVICE_BATCH_SIZE=4, TOTAL_BATCH_SIZE=2048),
    "d2-b4-4k": dict(DEPTH=2, DEVICE_BATCH_SIZE=4, TOTAL_BATCH_SIZE=4096),   # same total, 2 micro-batches
    "d2-b16-8k": dict(DEPTH=2, DEVICE_BATCH_SIZE=16, TOTAL_BATCH_SIZE=8192),
    "d2-L-b4-2k": dict(DEPTH=2, WINDOW_PATTERN='"L"', DEVICE_BATCH_SIZE=4, TOTAL_BATCH_SIZE=2048),
    "d1-ar256": dict(DEPTH=1, ASPECT_RATIO=256),            # width 256, one layer
    # around d2-L, the tier since the first sweep, once the chunked loss (backends/loss_torch.py) made steps ~3x cheaper
    "d3-L-ar32": dict(DEPTH=3, ASPECT_RATIO=32, WINDOW_PATTERN='"L"'),   # width 128, 3 layers
    "d4-L-ar32": dict(DEPTH=4, ASPECT_RATIO=32, WINDOW_PATTERN='"L"'),   # width 128, 4 layers
    "d2-L-ar128": dict(DEPTH=2, ASPECT_RATIO=128, WINDOW_PATTERN='"L"'),  # width 256, 2 layers
    "d2-L-b16-8k": dict(DEPTH=2, WINDOW_PATTERN='"L"', DEVICE_BATCH_SIZE=16, TOTAL_BATCH_SIZE=8192),
    "d2-L-b8-8k": dict(DEPTH=2, WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE=8192),   # 2 micro-batches of 8
    "d2-L-b32-16k": dict(DEPTH=2, WINDOW_PATTERN='"L"', DEVICE_BATCH_SIZE=32, TOTAL_BATCH_SIZE=16384),
    "d3-L-ar32-b16-8k": dict(DEPTH=3, ASPECT_RATIO=32, WINDOW_PATTERN='"L"', DEVICE_BATCH_SIZE=16,
                             TOTAL_BATCH_SIZE=8192),
    # learning rates at the tier chosen with the chunked head (d2-L-b16-8k); upstream's values elsewhere
    "b16-mlr0.06": dict(DEPTH=2, WINDOW_PATTERN='"L"', DEVICE_BATCH_SIZE=16, TOTAL_BATCH_SIZE=8192, MATRIX_LR=0.06),
    "b16-mlr0.02": dict(DEPTH=2, WINDOW_PATTERN='"L"', DEVICE_BATCH_SIZE=16, TOTAL_BATCH_SIZE=8192, MATRIX_LR=0.02),
    "b16-elr0.3": dict(DEPTH=2, WINDOW_PATTERN='"L"', DEVICE_BATCH_SIZE=16, TOTAL_BATCH_SIZE=8192, EMBEDDING_LR=0.3),
}
CONFIGS = {name: {**OLD_DEFAULT, **settings} for name, settings in CONFIGS.items()}
SCREEN = ["default", "d2", "d2-ar128", "d3-L", "d2-L", "d4", "d3-ar32", "d2-b4-2k", "d2-b4-4k", "d2-b16-8k"]


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def run(config, dataset, budget, workdir, nice):
    with open(os.path.join(ROOT, "train.py")) as f:
        text = edit_block(f.read(), [(k, str(v)) for k, v in CONFIGS[config].items()])
    script = os.path.join(workdir, "train.py")
    with open(script, "w") as f:
        f.write(text)
    env = dict(os.environ, AUTORESEARCH_DATASET=dataset, AUTORESEARCH_TIME_BUDGET=str(budget),
               AUTORESEARCH_BACKEND="cpu", PYTHONPATH=ROOT)
    for var in ("AUTORESEARCH_MAX_SEQ_LEN", "AUTORESEARCH_EVAL_TOKENS", "AUTORESEARCH_RUN_DIR"):
        env.pop(var, None)
    cmd = ([] if nice is None else ["nice", "-n", str(nice)]) + [sys.executable, script]
    before, t0 = loadavg(), time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, timeout=budget * 4 + 900, cwd=ROOT)
    wall, after = time.time() - t0, loadavg()
    out = r.stdout.decode(errors="replace")
    if r.returncode != 0 or "\n---\n" not in out:
        return dict(config=config, dataset=dataset, error=(out + r.stderr.decode(errors="replace"))[-300:],
                    load_before=before, load_after=after)
    s = dict(re.findall(r"^(\w+):\s+(.+?)\s*$", out.rsplit("\n---\n", 1)[1], flags=re.M))
    width = re.search(r"'n_embd': (\d+)", out).group(1)
    train_s, total_s = float(s["training_seconds"]), float(s["total_seconds"])
    rates = sorted(int(t.replace(",", "")) for t in re.findall(r"tok/sec: ([\d,]+)", out))  # per step
    return dict(config=config, dataset=dataset, val_bpb=float(s["val_bpb"]), steps=int(s["num_steps"]),
                tok_s=rates[len(rates) // 2], params=s["num_params_M"], depth=s["depth"],
                width=width, overhead=total_s - train_s, wall=wall, load_before=before, load_after=after)


HEADER = ("| # | config | dataset | settings | depth/width | params M | val_bpb | steps | tok/s (median step) | overhead s | "
          "loadavg before → after |\n|---|---|---|---|---|---|---|---|---|---|---|")


def row(i, r):
    settings = ", ".join(f"{k}={v}" for k, v in CONFIGS[r["config"]].items()
                         if OLD_DEFAULT.get(k) != v).replace('"', "") or "(depth 3 SSSL, the old default)"
    if "error" in r:
        return f"| {i} | {r['config']} | {r['dataset']} | {settings} | | | FAILED | | | | {r['load_before']} → " \
               f"{r['load_after']} |"
    return (f"| {i} | {r['config']} | {r['dataset']} | {settings} | {r['depth']}/{r['width']} | {r['params']} | "
            f"{r['val_bpb']:.4f} | {r['steps']} | {r['tok_s']:,.0f} | {r['overhead']:.1f} | "
            f"{r['load_before']} → {r['load_after']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="bench", help="comma list of prepared dataset names (default bench)")
    ap.add_argument("--configs", default=",".join(SCREEN), help="comma list (default: the screening set)")
    ap.add_argument("--budget", type=float, default=60, help="training seconds per run (default 60)")
    ap.add_argument("--no-repeat", action="store_true", help="do not repeat the first config at the end")
    ap.add_argument("--nice", type=int, default=None, help="run the trainer under nice -n N (e.g. -5)")
    ap.add_argument("--out", default=None, help="markdown file to append rows to (default: stdout only)")
    ap.add_argument("--list", action="store_true", help="print the configs and exit")
    args = ap.parse_args()
    if args.list:
        for name, settings in CONFIGS.items():
            print(f"{name:12} {settings or '(tier default)'}")
        return
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown config(s) {', '.join(unknown)}; see --list")
    if not args.no_repeat and len(configs) > 1:
        configs.append(configs[0])  # drift check
    datasets = args.datasets.split(",")

    head = (f"\n### budget {args.budget:g} s, datasets {', '.join(datasets)}, started {time.strftime('%Y-%m-%d %H:%M')}, "
            f"{os.cpu_count()} cores\n\n{HEADER}")
    print(head, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(head + "\n")
    results, i = [], 0
    with tempfile.TemporaryDirectory(prefix="ar-cpu-sweep-") as workdir:
        for config in configs:
            for dataset in datasets:
                i += 1
                r = run(config, dataset, args.budget, workdir, args.nice)
                results.append(r)
                line = row(i, r)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
    print()
    for dataset in datasets:
        ok = sorted((r for r in results if r["dataset"] == dataset and "error" not in r), key=lambda r: r["val_bpb"])
        print(f"{dataset}: " + "  ".join(f"{r['config']} {r['val_bpb']:.4f}" for r in ok))


if __name__ == "__main__":
    main()
