"""
`uv run python -m backends`: what hardware this is, which backend and training script will run, the evaluation
profile, and the suggested model/batch config. Exit code 2 if the forced backend cannot run here.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from backends.hardware import (BackendUnavailable, detect_backend, format_flops, get_hardware_info,
                               measure_cpu_peak_flops, print_hardware_summary, training_script_for)
from backends.tiers import suggest_hyperparameters

DEFAULT_MAX_SEQ_LEN = 2048


def load_profile():
    """prepare.get_profile(), or None when prepare.py is missing or has no get_profile()."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # prepare.py lives at the project root
    try:
        import prepare
    except ModuleNotFoundError as e:
        if e.name != "prepare":
            raise
        return None
    return prepare.get_profile() if hasattr(prepare, "get_profile") else None


def main():
    parser = argparse.ArgumentParser(prog="python -m backends", description="Show the detected hardware, training backend, evaluation profile and suggested config.")
    parser.add_argument("--remeasure", action="store_true",
                        help="re-run the CPU GEMM benchmark instead of using the cached peak (e.g. after a busy run)")
    args = parser.parse_args()
    try:
        hw = get_hardware_info()
        if args.remeasure:
            flops, source = measure_cpu_peak_flops(hw.cpu_model, refresh=True)
            cpu_peak = f"CPU peak fp32: {format_flops(flops)} ({source})"
            if hw.kind == "cpu":
                hw, cpu_peak = replace(hw, peak_flops=flops, peak_flops_source=source), None
    except ValueError as e:  # bad AUTORESEARCH_CPU_PEAK_FLOPS
        print(f"error: {e}")
        return 2
    print_hardware_summary(hw)
    if args.remeasure and cpu_peak:
        print(f"  {cpu_peak}")
    try:
        backend = detect_backend()
    except BackendUnavailable as e:
        print(f"error: {e}")
        return 2
    print(f"Detected backend: {backend} (training script: {training_script_for(backend)})")
    if hw.kind in ("nvidia", "amd") and backend != "cuda":
        print(f"  note: PyTorch cannot use the {hw.chip_name}; training runs on {backend}")

    max_seq_len = DEFAULT_MAX_SEQ_LEN
    try:
        profile = load_profile()
    except Exception as e:  # prepare.py mid-edit, or its one-line errors (AUTORESEARCH_PROFILE=bogus): no traceback
        profile = None
        print(f"Evaluation profile: (prepare.py not available: {type(e).__name__}: {e})")
    else:
        if profile is None:
            print("Evaluation profile: (prepare.py not available)")
    if profile is not None:
        max_seq_len = profile.max_seq_len
        print(f"Evaluation profile: {profile.name} (max_seq_len {profile.max_seq_len}, "
              f"eval_tokens {profile.eval_tokens:,}; {profile.source})")

    cfg = suggest_hyperparameters(hw, max_seq_len=max_seq_len, backend=backend)
    accum = cfg["total_batch_size"] // (cfg["device_batch_size"] * max_seq_len)
    print(f"Suggested config (tier {cfg['tier']}, max_seq_len {max_seq_len}):")
    print(f"  Depth: {cfg['depth']}")
    print(f"  Device batch size: {cfg['device_batch_size']}")
    plural = "es" if accum > 1 else ""
    print(f"  Total batch size: {cfg['total_batch_size']:,} tokens ({accum} micro-batch{plural} per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
