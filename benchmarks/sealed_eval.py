"""
What the sealed evaluation adds per experiment, against today's in-process evaluate_bpb. For each backend: one real
training run of the script (default config unless --set, a short budget) that exports its model the way the agent
loop asks it to (AUTORESEARCH_RUN_DIR), then the engine's evaluator on that export, run exactly as tui.sealed runs it
(python -I -B, prepare.py's text on stdin, the installed bytecode: as under bubblewrap), twice: "cold" is the first
evaluation after the training run, "warm" a second one, and evaluate_bpb of the same model in-process (what the trainer did before). Prints seconds and
the added time as a share of the standard 300 s budget.

    uv run benchmarks/sealed_eval.py --corpus ../shared/data/bench-corpus
    uv run benchmarks/sealed_eval.py --backends cpu,mlx --budget 20 --set DEPTH=2

The trainer's own imports use a warmed pycache (as on a machine where the packages were imported before), so the export
time is torch.export's, not the compilation of torch's modules.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from throughput import BACKEND_SCRIPTS, ROOT, edit_block, parse_run_options, prepare_corpus  # noqa: E402
from tui.executor import RunSpec  # noqa: E402
from tui.sealed import Evaluator  # noqa: E402

WARM_IMPORTS = """
import torch
class M(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
torch.export.save(torch.export.export(M(), (torch.zeros(1, 1, 4, 8),)), "warm.pt2")
torch.export.load("warm.pt2").module()
"""

IN_PROCESS = {  # evaluate_bpb of the run's model, timed as the trainer ran it (its first call builds the rows)
    "torch": """
import json, sys, time, torch, prepare, train
tokenizer = prepare.Tokenizer.from_directory()
model = train.GPT(train.build_model_config(train.DEPTH, tokenizer.get_vocab_size()))
model.load_state_dict(torch.export.load(sys.argv[1]).state_dict)  # the run's own export: trusted here
model.eval()
t0 = time.time()
value = prepare.evaluate_bpb(model, tokenizer, train.DEVICE_BATCH_SIZE)
print(json.dumps({"val_bpb": value, "seconds": time.time() - t0}))
""",
    "mlx": """
import json, time, mlx.core as mx, prepare, train_mlx
tokenizer = prepare.Tokenizer.from_directory()
model = train_mlx.GPT(train_mlx.build_model_config(train_mlx.DEPTH, tokenizer.get_vocab_size()))
model.init_weights()  # an .mlxfn gives no weights back: the time does not depend on them
mx.eval(model.parameters())
t0 = time.time()
value = prepare.evaluate_bpb(model, tokenizer, train_mlx.DEVICE_BATCH_SIZE)
print(json.dumps({"val_bpb": None, "seconds": time.time() - t0}))
""",
}


def last_json(text):
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


def measure(backend, env, budget, settings, workdir):
    work = Path(workdir) / backend
    run_dir = work / "run"
    run_dir.mkdir(parents=True)
    name = BACKEND_SCRIPTS[backend]
    with open(os.path.join(ROOT, name)) as f:
        text = f.read()
    (work / name).write_text(edit_block(text, settings) if settings else text)
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    trainer_env = dict(base, **env, PYTHONPATH=ROOT, PYTHONPYCACHEPREFIX=str(Path(workdir) / "pyc"))
    subprocess.run([sys.executable, "-c", WARM_IMPORTS], cwd=work, env=trainer_env, check=True, capture_output=True)

    r = subprocess.run([sys.executable, name], cwd=work, capture_output=True, timeout=budget * 3 + 900,
                       env=dict(trainer_env, AUTORESEARCH_TIME_BUDGET=str(budget), AUTORESEARCH_BACKEND=backend,
                                AUTORESEARCH_RUN_DIR=str(run_dir)))
    out = r.stdout.decode(errors="replace")
    exported = re.search(r"Exported the model for the sealed evaluation: .* in ([\d.]+)s", out)
    if r.returncode != 0 or not exported:
        sys.exit(f"error: the {backend} run failed (exit {r.returncode}):\n"
                 f"{(out + r.stderr.decode(errors='replace'))[-1500:]}")

    framework = "mlx" if backend == "mlx" else "torch"
    helper_env = dict(trainer_env, AUTORESEARCH_TRAIN_BACKEND="cpu" if framework == "torch" else backend)
    h = subprocess.run([sys.executable, "-c", IN_PROCESS[framework], str(run_dir / "model.pt2")], cwd=work,
                       env=helper_env, capture_output=True, text=True, timeout=1800)
    if h.returncode != 0:
        sys.exit(f"error: the in-process evaluation failed:\n{h.stderr[-1500:]}")
    in_process = last_json(h.stdout)

    evaluator = Evaluator(ROOT)
    spec = RunSpec(commit="-", script=name, seed=None, budget=budget, dataset=env.get("AUTORESEARCH_DATASET", ""),
                   deadline=1800.0, log_path=None, env=dict(os.environ, **env), run_dir=run_dir)
    sealed = []
    for _ in ("cold", "warm"):
        t0 = time.monotonic()
        e = subprocess.run(evaluator.argv(spec), input=evaluator.source, cwd=ROOT, env=spec.env,
                           capture_output=True, timeout=1800)
        if e.returncode != 0:
            sys.exit(f"error: the sealed evaluation failed:\n{e.stderr.decode(errors='replace')[-1500:]}")
        sealed.append(dict(last_json(e.stdout.decode()), wall=time.monotonic() - t0))
    return dict(export=float(exported.group(1)), in_process=in_process, cold=sealed[0], warm=sealed[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="cpu", help="comma list of cpu, mlx, cuda, mps (default cpu)")
    ap.add_argument("--budget", type=float, default=30, help="training seconds of the run (default 30)")
    args, settings = parse_run_options(ap)
    workdir = tempfile.mkdtemp(prefix="ar-sealed-")
    try:
        env = prepare_corpus(args.corpus, workdir) if args.corpus else {}
        results = {}
        for b in args.backends.split(","):
            print(f"running {b} (budget {args.budget:g}s), then its sealed evaluation twice ...", flush=True)
            results[b] = measure(b, env, args.budget, settings, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"config: {', '.join(f'{k}={v}' for k, v in settings) or 'defaults'}; seconds per experiment; "
          f"added = export + warm sealed evaluation - in-process evaluation; % of the standard 300 s budget")
    head = (f"{'backend':8} {'export':>7} {'in-proc eval':>12} {'sealed cold (load)':>19} "
            f"{'sealed warm (load)':>19} {'added':>7} {'% 300s':>7}  val_bpb sealed / in-process")
    print(head)
    print("-" * len(head))
    for b, m in results.items():
        cold, warm, ip = m["cold"], m["warm"], m["in_process"]
        added = m["export"] + warm["wall"] - ip["seconds"]
        vals = f"{warm['val_bpb']:.6f} / " + ("-" if ip["val_bpb"] is None else f"{ip['val_bpb']:.6f}")
        print(f"{b:8} {m['export']:>7.1f} {ip['seconds']:>12.1f} {cold['wall']:>11.1f} ({cold['load_seconds']:>4.1f}) "
              f"{warm['wall']:>11.1f} ({warm['load_seconds']:>4.1f}) {added:>7.1f} {100 * added / 300:>7.1f}  {vals}")


if __name__ == "__main__":
    main()
