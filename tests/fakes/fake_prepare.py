"""Fake prepare.py for the agent tests: a protected file, and the sealed evaluator's protocol.

`python prepare.py --evaluate RUN_DIR` reads the stand-in trainer's "export" (RUN_DIR/fake_model.json) and prints
the real evaluator's one JSON line, or exits non-zero with a one-line error, as prepare.py does. An export with
"eval_sleep" makes the evaluation take that long (it writes RUN_DIR/evaluator.pid first, for kill tests).
"""
TIME_BUDGET = 1

if __name__ == "__main__":
    import json
    import os
    import sys
    import time

    if sys.argv[1:2] == ["--evaluate"]:
        run_dir = sys.argv[2]
        try:
            with open(os.path.join(run_dir, "fake_model.json")) as f:
                export = json.load(f)
            val_bpb = export["val_bpb"]
        except FileNotFoundError:
            sys.exit(f"error: no fake_model.json in {run_dir}: the trainer exported no model (keep the "
                     f"prepare.export_model(...) call at the end of the training script)")
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"error: no usable export in {run_dir} ({type(e).__name__}): export with "
                     f"prepare.export_model(...)")
        if export.get("eval_sleep"):
            with open(os.path.join(run_dir, "evaluator.pid"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(export["eval_sleep"])
        print(json.dumps({"val_bpb": val_bpb, "tokens": 4096, "seconds": 0.01, "model": "fake_model.json"}))
