"""
Scaling of parallel slots: experiments per hour at 1, 2, 4 and 8 slots, and the loop's overhead per experiment.

    uv run benchmarks/scaling.py                          # 1 2 4 8 slots, 3 s runs, 6 rounds each (~3 min)
    uv run benchmarks/scaling.py --slots 1 2 --seconds 5 --rounds 4
    uv run benchmarks/scaling.py --executor ray           # through the Ray executor (a cluster must be running)

The real engine (tui.orchestrator with tui.slots: git commits on their own refs, results.tsv, the keep rule, the
sealed evaluation, the sandbox) drives a trainer stand-in of fixed duration: tests/fakes/fake_train.py, a real
process that sleeps --seconds and prints a valid summary. The scripted LLM server (tests/fakes) answers every prompt
at once with a different null change, so every experiment is discarded and the best never moves: this measures the
loop, not the research. The trainers sleep, so N slots on 2 cores scale here although training would not: what is
measured is the engine's share.

    rate        candidates / wall-clock time from the first candidate's start to the last one's end
    efficiency  rate at N slots / (N x the rate at 1 slot)
    overhead    N x wall-clock per candidate - the trainer's own time (the `seconds` column): process starts, the
                sealed evaluation, git, results.tsv, the integrity check, the LLM round trip
Writes only into a temporary directory.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fakes.agent import hp_answer, make_config  # noqa: E402
from fakes.llm_servers import FakeLLMServer  # noqa: E402
from fakes.repo import agent_repo, git  # noqa: E402
from tui.events import AgentListener  # noqa: E402
from tui.orchestrator import Orchestrator  # noqa: E402
from tui.results import ResultsFile  # noqa: E402

STEPS = 10  # the trainer's progress lines per run (it sleeps seconds / STEPS after each)


class Clock(AgentListener):
    """When the first candidate started and the last one ended."""

    def __init__(self):
        self.first = self.last = None

    def on_experiment_start(self, info):
        if info.exp > 0 and self.first is None:
            self.first = time.monotonic()

    def on_experiment_end(self, result):
        if result.exp > 0:
            self.last = time.monotonic()


def measure(slots: int, seconds: float, rounds: int, executor_name: str, sandbox: str, work: Path,
            ray_address: str = "auto") -> dict:
    repo = agent_repo(work / f"repo{slots}")
    candidates = slots * rounds
    server = FakeLLMServer("anthropic").start()
    try:
        for k in range(candidates):
            server.push(server.text(hp_answer(f"null change {k}", steps=STEPS, step_sleep=seconds / STEPS,
                                              extra=f"NULL_EDIT = {k}")))
        os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-api03-BENCH-0123456789abcdef")
        cfg = make_config(repo, server, max_experiments=candidates + 1, workers=slots, sandbox=sandbox,
                          timeout=seconds + 120, time_budget=seconds, max_consecutive_crashes=0,
                          executor=executor_name, ray_address=ray_address)
        clock = Clock()
        # the baseline's own run is not timed: it trains alone, before any candidate
        (repo / "train.py").write_text((repo / "train.py").read_text().replace(
            "STEP_SLEEP = 0.0", f"STEP_SLEEP = {seconds / STEPS}"))
        git(repo, "commit", "-qam", "fixed-duration trainer")
        summary = Orchestrator(cfg, [clock]).run()
    finally:
        server.stop()
    if not summary.ok:
        sys.exit(f"{slots} slots: the loop failed: {summary.reason}")
    rows = [r for r in ResultsFile(repo / "results.tsv").load() if r.exp and r.exp > 0]
    elapsed = clock.last - clock.first
    trainer = sum(r.seconds or 0.0 for r in rows) / len(rows)
    return {"slots": slots, "candidates": len(rows), "elapsed": elapsed, "rate": len(rows) / elapsed * 3600,
            "trainer": trainer, "overhead": slots * elapsed / len(rows) - trainer,
            "crashed": sum(1 for r in rows if r.status == "crash")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seconds", type=float, default=3.0, help="how long each run trains (sleeps)")
    ap.add_argument("--rounds", type=int, default=6, help="candidates per slot")
    ap.add_argument("--executor", choices=("local", "ray"), default="local")
    ap.add_argument("--ray-address", default="auto", help="with --executor ray: the cluster (default: auto)")
    ap.add_argument("--sandbox", default="auto", help="tui.sandbox choice for the runs (default: auto)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ar-scaling-") as tmp:
        for n in args.slots:
            r = measure(n, args.seconds, args.rounds, args.executor, args.sandbox, Path(tmp), args.ray_address)
            results.append(r)
            print(f"  {n} slot{'s' if n > 1 else ''}: {r['candidates']} experiments in {r['elapsed']:.1f}s",
                  flush=True)
    base = next((r["rate"] for r in results if r["slots"] == 1), None)
    print(f"\nexecutor {args.executor}, runs of {args.seconds:g}s (sleeping), {args.rounds} per slot")
    print(f"{'slots':>5} {'experiments':>11} {'wall s':>7} {'exp/hour':>9} {'efficiency':>10} {'trainer s':>9} "
          f"{'overhead s/exp':>14} {'crashed':>7}")
    for r in results:
        eff = f"{r['rate'] / (r['slots'] * base) * 100:.0f} %" if base else "-"
        print(f"{r['slots']:>5} {r['candidates']:>11} {r['elapsed']:>7.1f} {r['rate']:>9.0f} {eff:>10} "
              f"{r['trainer']:>9.2f} {r['overhead']:>14.2f} {r['crashed']:>7}")


if __name__ == "__main__":
    main()
