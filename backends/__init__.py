"""
Hardware detection, backend choice and tier defaults. `uv run python -m backends` prints what it finds.

Importing this package never imports torch or mlx (they load lazily inside the functions that need them).
"""

from backends.hardware import (
    BackendUnavailable,
    HardwareInfo,
    detect_backend,
    get_hardware_info,
    get_peak_flops,
    get_peak_memory_mb,
    print_hardware_summary,
    sync_device,
    training_script_for,
)
from backends.tiers import suggest_hyperparameters

__all__ = [
    "BackendUnavailable",
    "HardwareInfo",
    "detect_backend",
    "get_hardware_info",
    "get_peak_flops",
    "get_peak_memory_mb",
    "print_hardware_summary",
    "suggest_hyperparameters",
    "sync_device",
    "training_script_for",
]
