"""
Default model size and batch size for the detected hardware.

A tier picks (depth, device_batch_size, total_batch_size). total_batch_size is in tokens; device_batch_size is the most
rows one micro-batch may hold (memory), lowered where one micro-batch of them would exceed the total at this context,
so a tier's total is the one it publishes (Apple base: 4K tokens per step = 2 rows of 2048, not 4 rows = 8K). The
total is then rounded up to a whole number of micro-batches (device_batch_size * max_seq_len), so gradient
accumulation always divides evenly.
"""

import math

# -----------------------------------------------------------------------------
# Tier tables: (depth, device_batch_size, total_batch_size in tokens)

# Apple Silicon, by chip tier (the port's published table, "validated by characterization"): tokens per step base 4K,
# Pro 8K, Max 32K, Ultra 64K. The device batch is the most rows per micro-batch (4 at base): at context 2048 base
# trains 2 rows per step and Pro 4, at context 512 base 4 rows twice.
APPLE_TIERS = {
    "ultra": (10, 32, 2**16),
    "max": (8, 16, 2**15),
    "pro": (6, 8, 2**13),
    "base": (4, 4, 2**12),
}
# Chip tier unknown: guess it from unified memory (GB).
APPLE_MEMORY_TIERS = [(128, "ultra"), (48, "max"), (18, "pro"), (0, "base")]

# NVIDIA / AMD, by device memory. The 80 GB row is upstream autoresearch's H100 config.
CUDA_TIERS = [  # (nominal device memory GB, tier name, depth, device_batch_size, total_batch_size)
    (80, "cuda-80gb", 8, 128, 2**19),
    (40, "cuda-40gb", 8, 64, 2**18),
    (20, "cuda-20gb", 8, 32, 2**17),
    (12, "cuda-12gb", 6, 16, 2**16),
    (0, "cuda-small", 4, 8, 2**15),
]
# Cards report less than their nominal size (an "80 GB" H100 shows ~79.2 GiB, a 24 GB 4090 ~23.6), so a card
# qualifies for a row at 90% of the row's nominal size.
CUDA_MEMORY_SLACK = 0.9

# CPU: depth 2 (model dim 128, one head, 3.5M parameters), 16 x 512-token rows, one micro-batch (8,192 tokens) per
# step, and (in the trainers) window pattern "L": every layer full-context, which takes SDPA's causal fast path at 512.
# Chosen by val_bpb at 5 minutes on two corpora (benchmarks/cpu_sweep.md; 2-core EPYC, quiet, with the chunked loss
# head that made steps ~3x cheaper): bench / manpages
#   16 x 512: 1.740 / 0.552    8 x 512 (the tier before): 1.775 / 0.575    32 x 512: 1.764 / 0.578
#   depth 3 at width 128: 1.749 / 0.586 (8 x 512), 1.769 / 0.589 (16 x 512)
# after a 60 s screening of depth, width and batch around it. total_batch_size None = no accumulation.
CPU_TIER = (2, 16, None)

# Which table a backend trains with when the hardware kind alone would mislead (mlx[cpu] on Linux, cpu on a Mac).
_BACKEND_FAMILY = {"mlx": "apple", "mps": "apple", "cuda": "cuda", "cpu": "cpu"}
_KIND_FAMILY = {"apple": "apple", "nvidia": "cuda", "amd": "cuda", "cpu": "cpu"}

# -----------------------------------------------------------------------------


def _pick(hw, backend):
    family = _BACKEND_FAMILY[backend] if backend else _KIND_FAMILY[hw.kind]
    if family == "apple" and hw.kind != "apple":
        family = "cpu"  # MLX's CPU backend on a non-Apple machine
    if family == "apple":
        tier = hw.chip_tier if hw.chip_tier in APPLE_TIERS else next(
            name for min_gb, name in APPLE_MEMORY_TIERS if hw.memory_gb >= min_gb)
        return (f"apple-{tier}", *APPLE_TIERS[tier])
    if family == "cuda":
        for min_gb, name, depth, device_batch, total_batch in CUDA_TIERS:
            if hw.memory_gb >= min_gb * CUDA_MEMORY_SLACK:
                return name, depth, device_batch, total_batch
    return ("cpu", *CPU_TIER)


def suggest_hyperparameters(hw, max_seq_len=2048, backend=None):
    """dict(depth, device_batch_size, total_batch_size, tier) for this hardware.

    backend: the backend that will train ("mlx"|"mps"|"cuda"|"cpu"); pass it when it may differ from what the
    hardware suggests (AUTORESEARCH_BACKEND=cpu on a GPU machine, MLX on a Linux CPU). None = go by hw.kind.
    """
    tier, depth, device_batch, total_batch = _pick(hw, backend)
    if total_batch:  # no micro-batch bigger than the whole step
        device_batch = max(1, min(device_batch, total_batch // max_seq_len))
    micro_batch_tokens = device_batch * max_seq_len
    total_batch = micro_batch_tokens * max(1, math.ceil((total_batch or micro_batch_tokens) / micro_batch_tokens))
    return dict(depth=depth, device_batch_size=device_batch, total_batch_size=total_batch, tier=tier)
