"""
`uv run python -m backends`: what hardware this is, which backend and training script will run, the evaluation
profile, and the suggested model/batch config. Exit code 2 if the forced backend cannot run here.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from backends.hardware import (BackendUnavailable, choose_cpu_dtype, cpu_peak_entry, detect_backend, format_flops,
                               get_hardware_info, peak_spread, print_hardware_summary, training_script_for)
from backends.tiers import suggest_hyperparameters

DEFAULT_MAX_SEQ_LEN = 2048


def load_profile(backend, apple_silicon):
    """prepare.get_profile() for this backend, or None when prepare.py is missing or has no get_profile()."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # prepare.py lives at the project root
    try:
        import prepare
    except ModuleNotFoundError as e:
        if e.name != "prepare":
            raise
        return None
    if not hasattr(prepare, "get_profile"):
        return None
    try:
        return prepare.get_profile(backend=backend, apple_silicon=apple_silicon)
    except TypeError:  # an older prepare.py: no backend argument
        return prepare.get_profile()


def print_remeasured(entry, where):
    """The fresh CPU peak: each dtype's best round and the spread of the rounds."""
    print(f"  CPU peak fp32: {format_flops(entry['flops'])} ({entry['method']}; {where})")
    print(f"    rounds: {peak_spread(entry)}")
    bf16 = entry.get("bf16", {})
    if bf16.get("flops"):
        print(f"  CPU peak bf16: {format_flops(bf16['flops'])} ({bf16['method']})")
        print(f"    rounds: {peak_spread(bf16)}")
    else:
        print(f"  CPU peak bf16: not measured ({bf16.get('skipped', 'unknown')})")
    if entry.get("training_runs") or (entry.get("busy_percent") or 0) >= 25:
        print(f"  note: other processes were using {entry.get('busy_percent', 0):.0f}% CPU"
              + (f", {', '.join(entry['training_runs'])} was running" if entry.get("training_runs") else "")
              + ": the figures are low")


def main():
    parser = argparse.ArgumentParser(prog="python -m backends", description="Show the detected hardware, training backend, evaluation profile and suggested config.")
    parser.add_argument("--remeasure", action="store_true",
                        help="re-run the CPU GEMM benchmark instead of using the cached peak (e.g. after a busy run)")
    args = parser.parse_args()
    try:
        hw = get_hardware_info()
        if args.remeasure:  # the GEMMs themselves, whatever AUTORESEARCH_CPU_PEAK_FLOPS says
            entry, where = cpu_peak_entry(hw.cpu_model if not hw.simulated else None, None, refresh=True)
            if hw.kind == "cpu":
                hw = replace(hw, peak_flops=entry["flops"], peak_flops_source=f"measured: {entry['method']} ({where})")
    except ValueError as e:  # bad AUTORESEARCH_CPU_PEAK_FLOPS or AUTORESEARCH_SIMULATE_HARDWARE
        print(f"error: {e}")
        return 2
    print_hardware_summary(hw)
    if args.remeasure:
        print_remeasured(entry, where)
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
        profile = load_profile(backend, hw.kind == "apple")
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
    if backend == "cpu":
        width = -(-cfg["depth"] * 64 // 128) * 128  # train.py's default model_dim (ASPECT_RATIO 64, HEAD_DIM 128)
        try:
            dtype, why = choose_cpu_dtype(width, cfg["device_batch_size"] * max_seq_len, refresh=args.remeasure)
        except ValueError as e:  # bad AUTORESEARCH_CPU_DTYPE
            print(f"error: {e}")
            return 2
        print(f"  CPU compute dtype: { {'float32': 'fp32', 'bfloat16': 'bf16'}[dtype]} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
