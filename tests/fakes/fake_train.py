"""Stand-in trainer for the agent tests: prints exactly the trainer output contract, fast.

val_bpb is a function of the hyperparameter block (best near LEARNING_RATE = 0.02, DEPTH = 6), so a good edit really
improves and a bad one really worsens. Like the real trainers, a run with AUTORESEARCH_RUN_DIR "exports" instead of
printing val_bpb: it writes RUN_DIR/fake_model.json, which the fake prepare.py's --evaluate scores. MODE makes it
crash, hang, diverge, tamper with prepare.py, and so on. It writes only into its run directory ($AUTORESEARCH_RUN_DIR,
runs/ without one; a sandboxed run can write nowhere else, and the directory is removed after the run): trainer.pid
and grandchild.pid (MODE "hang"). With AUTORESEARCH_FAKE_PRINT_ENV set it prints its environment ("fake_train env:
{...}"), so tests can check in runs/expN.log, after the run, that no secret reached it.

MODE "noisy" adds Gaussian noise (standard deviation AUTORESEARCH_FAKE_NOISE, default 0.01) drawn from the seed and the
script's text: a re-run with another seed, or any edit (even a no-op line), draws new noise, as a real trainer would.
EVAL_SLEEP = <seconds> in the block makes the fake evaluator take that long. With SEED_GATES = True in the block,
a file runs/slow-seed-<seed> makes the run with that seed slow (for kill tests) and runs/crash-seed-<seed> makes it
crash. SLOW_GATE = "<name>" in the block makes the run slow while the file <name> exists in $AUTORESEARCH_FAKE_GATES
(runs/ by default).
"""

import json
import math
import os
import random
import subprocess
import sys
import time
import zlib

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

LEARNING_RATE = 0.01
DEPTH = 4
MODE = "ok"  # ok | crash | hang | slow | stubborn | nan | nanbpb | tamper | unicode | noisy
STEPS = 5
STEP_SLEEP = 0.0

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
RUN_DIR = os.environ.get("AUTORESEARCH_RUN_DIR") or "runs"
os.makedirs(RUN_DIR, exist_ok=True)
if os.environ.get("AUTORESEARCH_FAKE_PRINT_ENV"):
    print("fake_train env: " + json.dumps(dict(os.environ)))
print("Backend: cpu (cpu)")
print(f"Seed {seed}, depth {DEPTH}, lr {LEARNING_RATE}")
if MODE == "unicode":
    print("données d'entraînement — 你好 ✓ naïve")
if MODE == "tamper":
    with open("prepare.py", "a") as f:
        f.write("\nTIME_BUDGET = 1e9  # tampered\n")
if MODE == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join(RUN_DIR, "grandchild.pid"), "w") as f:
        f.write(str(child.pid))
if globals().get("SEED_GATES") and os.path.exists(os.path.join("runs", f"slow-seed-{seed}")):
    STEP_SLEEP, STEPS = 0.5, 400
if globals().get("SLOW_GATE") and os.path.exists(os.path.join(os.environ.get("AUTORESEARCH_FAKE_GATES", "runs"),
                                                               SLOW_GATE)):
    STEP_SLEEP, STEPS = 0.5, 400
if globals().get("SEED_GATES") and os.path.exists(os.path.join("runs", f"crash-seed-{seed}")):
    MODE = "crash"
if MODE in ("slow", "stubborn"):
    STEP_SLEEP = 0.5
    STEPS = 400
if MODE == "stubborn":
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
with open(os.path.join(RUN_DIR, "trainer.pid"), "w") as f:
    f.write(str(os.getpid()))

# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

t0 = time.time()
for step in range(STEPS):
    loss = 3.0 - 0.1 * step
    if MODE == "nan" and step == 2:
        loss = float("nan")
    pct = 100.0 * (step + 1) / STEPS
    print(f"\rstep {step:05d} ({pct:.1f}%) | loss: {loss:.6f} | lrm: 1.00 | dt: 10ms | tok/sec: 4,000 | "
          f"mfu: 1.2% | epoch: 1 | remaining: {STEPS - step - 1}s    ", end="", flush=True)
    if math.isnan(loss):
        print()
        print("FAIL")
        sys.exit(1)
    if MODE == "crash" and step == 2:
        print()
        raise ValueError("boom: shapes (4, 8) and (5, 8) do not match")
    if MODE == "hang" and step == 1:
        time.sleep(600)
    time.sleep(STEP_SLEEP)
print()

val_bpb = 1.0 + 100.0 * (LEARNING_RATE - 0.02) ** 2 + 0.01 * abs(DEPTH - 6)
if MODE == "noisy":
    with open(__file__, "rb") as f:
        text_id = zlib.crc32(f.read())
    val_bpb += random.Random(f"{seed}:{text_id}").gauss(0.0, float(os.environ.get("AUTORESEARCH_FAKE_NOISE", "0.01")))
if MODE == "nanbpb":
    val_bpb = float("nan")
training_seconds = time.time() - t0
run_dir = os.environ.get("AUTORESEARCH_RUN_DIR")
if run_dir:  # the engine scores the "export" with prepare.py --evaluate (the fake one reads this file)
    with open(os.path.join(run_dir, "fake_model.json"), "w") as f:
        json.dump({"val_bpb": val_bpb, "eval_sleep": globals().get("EVAL_SLEEP", 0)}, f)
print("---")
if not run_dir:
    print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {training_seconds:.1f}")
print(f"total_seconds:    {training_seconds + 0.1:.1f}")
print(f"peak_vram_mb:     {512.0 + 64 * DEPTH:.1f}")
print(f"mfu_percent:      {1.20:.2f}")
print(f"total_tokens_M:   {0.02 * STEPS:.1f}")
print(f"num_steps:        {STEPS}")
print(f"num_params_M:     {1.5 * DEPTH:.1f}")
print(f"depth:            {DEPTH}")
print("backend:          cpu")
print("chip:             Fake CPU")
