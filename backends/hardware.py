"""
Hardware detection and backend choice.

What machine is this (Apple Silicon, NVIDIA/AMD GPU, or plain CPU), how much memory does it have, what is its
peak FLOP/s (for MFU), and which training backend should run on it (mlx, mps, cuda, cpu).

Sources, best first:
- Apple Silicon: `sysctl` (chip name, memory) and `system_profiler SPDisplaysDataType` (the real GPU core count);
  a (generation, tier) core table only when system_profiler says nothing.
- NVIDIA / AMD: torch.cuda device properties; `nvidia-smi` when torch cannot see the GPU. Peak from a datasheet table.
- CPU: /proc/cpuinfo or sysctl, psutil; the peak is *measured* once, before any training, with a 2048x2048 GEMM
  (5 rounds, the best counts; fp32, and bf16 too where the CPU flags show bf16 hardware) and cached with how it was
  measured in $AUTORESEARCH_CACHE_DIR/hardware.json (default ~/.cache/autoresearch). A measurement taken while
  another training run is going is used but not cached. The CPU compute dtype is measured the same way, per model
  width (choose_cpu_dtype).

Environment:
- AUTORESEARCH_BACKEND=auto|mlx|mps|cuda|cpu   force a backend (default auto)
- AUTORESEARCH_CACHE_DIR=path                  where hardware.json (the measured CPU peak and dtype) lives
- AUTORESEARCH_CPU_PEAK_FLOPS=2.5e11           skip the CPU GEMM measurement and use this FLOP/s instead
- AUTORESEARCH_CPU_DTYPE=fp32|bf16             skip the dtype measurement and train on the CPU in this dtype
- AUTORESEARCH_SIMULATE_HARDWARE=path          describe a recorded machine (tests/fixtures/hardware/m1, ...) instead
                                               of this one: for `python -m backends` and tests
`uv run python -m backends --remeasure` re-runs the GEMMs (e.g. if the cached ones ran while the machine was busy) and
shows the spread of the rounds.

Every command-output parser here is a pure function of the text, so it can be tested on recorded outputs.
torch and mlx are imported lazily inside functions: importing this module must stay cheap and work without either.
"""

import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# -----------------------------------------------------------------------------
# Constants and tables

BACKENDS = ("mlx", "mps", "cuda", "cpu")
SIMULATE_ENV = "AUTORESEARCH_SIMULATE_HARDWARE"  # describe a recorded machine instead of this one (simulated_fields)
COMMAND_TIMEOUT_S = 15  # system_profiler can take a few seconds on a cold start

# Apple GPU cores for the full (unbinned) part of each (generation, tier). Only a fallback: many chips ship binned
# (an M3 Max has 30 or 40 cores), and system_profiler reports the real number.
APPLE_GPU_CORES = {
    "M1": {"base": 8, "pro": 16, "max": 32, "ultra": 64},
    "M2": {"base": 10, "pro": 19, "max": 38, "ultra": 76},
    "M3": {"base": 10, "pro": 18, "max": 40, "ultra": 80},
    "M4": {"base": 10, "pro": 20, "max": 40, "ultra": 80},
    "M5": {"base": 10, "pro": 20, "max": 40, "ultra": 80},
}
# Estimated dense bf16 FLOP/s per Apple GPU core. Chips newer than the table use the newest row.
APPLE_FLOPS_PER_CORE = {"M1": 0.5e12, "M2": 0.55e12, "M3": 0.65e12, "M4": 0.7e12, "M5": 0.85e12}

# Dense (no sparsity) bf16 tensor-core FLOP/s from vendor datasheets, matched against the device name in order
# (more specific patterns first: "H100 PCIe" before "H100", "L40S" before "L40" before "L4", "A100" before "A10").
# GeForce numbers are with fp32 accumulation, which is what a bf16 torch matmul uses.
GPU_PEAK_BF16 = [
    (r"gb200|grace blackwell", "GB200", 2.5e15),
    (r"b200", "B200", 2.25e15),
    (r"h200.*(nvl|pcie)", "H200 NVL", 836e12),
    (r"h200|gh200", "H200", 989e12),
    (r"h100.*nvl", "H100 NVL", 835e12),
    (r"h100.*(pcie|hbm2e)", "H100 PCIe", 756e12),
    (r"h100", "H100 SXM", 989e12),
    (r"h800", "H800", 756e12),
    (r"a100|a800", "A100", 312e12),
    (r"a10g", "A10G", 125e12),
    (r"\ba10\b", "A10", 125e12),
    (r"\ba30\b", "A30", 165e12),
    (r"\ba40\b", "A40", 149.7e12),
    (r"l40s|l40-s", "L40S", 362e12),
    (r"\bl40\b", "L40", 181e12),
    (r"\bl4\b", "L4", 121e12),
    (r"rtx pro 6000", "RTX PRO 6000 Blackwell", 503.8e12),
    (r"rtx 6000 ada", "RTX 6000 Ada", 364.2e12),
    (r"rtx a6000", "RTX A6000", 154.8e12),
    (r"rtx 5090", "RTX 5090", 209.5e12),
    (r"rtx 4090", "RTX 4090", 165.2e12),
    (r"rtx 3090 ti", "RTX 3090 Ti", 80e12),
    (r"rtx 3090", "RTX 3090", 71e12),
    (r"mi355", "MI355X", 2.5e15),
    (r"mi350", "MI350X", 2.3e15),
    (r"mi325", "MI325X", 1.3074e15),
    (r"mi300x", "MI300X", 1.3074e15),
    (r"mi300a", "MI300A", 980.6e12),
    (r"mi250x", "MI250X", 383e12),
    (r"mi250", "MI250", 362.1e12),
    (r"mi210", "MI210", 181e12),
]

# NVIDIA architecture by compute capability, for the summary.
NVIDIA_ARCH = {"7.0": "Volta", "7.5": "Turing", "8.0": "Ampere", "8.6": "Ampere", "8.7": "Ampere", "8.9": "Ada",
               "9.0": "Hopper", "10.0": "Blackwell", "10.3": "Blackwell", "11.0": "Blackwell", "12.0": "Blackwell",
               "12.1": "Blackwell"}

# CPU vector extensions worth knowing about for matmul speed, in display order. x86 names are /proc/cpuinfo flags.
X86_EXTENSIONS = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                  "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"]
# aarch64 /proc/cpuinfo "Features" words -> our names ("asimd" is what Linux calls NEON).
ARM_EXTENSIONS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "bf16": "bf16", "sve": "sve",
                  "sve2": "sve2", "sme": "sme", "sme2": "sme2"}
# macOS `sysctl hw.optional` keys -> our names.
DARWIN_ARM_EXTENSIONS = {"hw.optional.neon": "neon", "hw.optional.arm.FEAT_DotProd": "dotprod",
                         "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_BF16": "bf16",
                         "hw.optional.arm.FEAT_SME": "sme", "hw.optional.arm.FEAT_SME2": "sme2"}
# Arm Ltd. cores by /proc/cpuinfo "CPU part" (implementer 0x41), since aarch64 Linux has no "model name" line.
ARM_CPU_PARTS = {"0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2",
                 "0xd8e": "Neoverse-N3", "0xd84": "Neoverse-V3", "0xd0b": "Cortex-A76", "0xd41": "Cortex-A78",
                 "0xd44": "Cortex-X1", "0xd4b": "Cortex-A78C"}

# CPU peak micro-benchmark: a 2048x2048 GEMM (big enough for BLAS steady state), timed in CPU_PEAK_ROUNDS rounds a
# moment apart, each the best of CPU_PEAK_REPS calls. The peak is the best round (other processes can only make a GEMM
# slower); the spread of the rounds shows how steady the machine was. ~2-3 s on 2 cores, once per machine.
CPU_GEMM_N = 2048
CPU_PEAK_ROUNDS = 5
CPU_PEAK_REPS = 2
CPU_PEAK_PAUSE_S = 0.2  # between rounds, so a burst of someone else's work can pass
CPU_PEAK_METHOD = 2  # cache entries measured another way (v1: one best-of-N burst) are measured again
# CPU flags of bf16 GEMM hardware (x86 AMX and AVX-512-BF16, Arm BF16). Elsewhere bf16 is emulated (~100x slower than
# fp32), so it is neither measured nor chosen.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# bf16 is the CPU compute dtype only if the model's own GEMMs run at least this much faster in bf16. Conservative: a
# step also has element-wise work and autocast's casts, so on an AMX Xeon a 4.5x faster 2048^2 GEMM gave no faster step
# at the CPU default's width, and on an AVX-512-BF16 EPYC the model's GEMMs at width 256 ran 2.6x faster in bf16
# without a step clearly faster (benchmarks/cpu_dtype.py). fp32 otherwise (also the safer numerics).
CPU_BF16_MIN_SPEEDUP = 3.0
CPU_DTYPE_MAX_ROWS = 8192  # the dtype GEMMs use at most this many rows (the speed ratio is settled well before)
TRAINING_SCRIPTS = ("train.py", "train_mlx.py")
HARDWARE_CACHE_FILE = "hardware.json"
BUSY_SAMPLE_S = 0.2  # how long to sample other processes' CPU use before the GEMM
BUSY_PERCENT = 25  # above this, the measured peak is probably low and the source says so


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here. The message is one line: what is wrong and what to do."""


@dataclass
class HardwareInfo:
    platform: str = ""                 # sys.platform
    machine: str = ""                  # platform.machine()
    kind: str = "cpu"                  # "apple" | "nvidia" | "amd" | "cpu"
    chip_name: str = ""                # "Apple M3 Max", "NVIDIA H100 80GB HBM3", or the CPU model
    chip_generation: str | None = None # "M3" for Apple, architecture ("Hopper") for NVIDIA
    chip_tier: str | None = None       # Apple only: "base" | "pro" | "max" | "ultra"
    memory_gb: float = 0.0             # GiB of the memory the model trains in
    memory_kind: str = "system"        # "unified" | "device" | "system"
    cpu_model: str = ""
    cpu_cores: int = 1                 # logical cores this process may use
    cpu_physical_cores: int | None = None
    vector_extensions: list = field(default_factory=list)
    gpu_cores: int | None = None       # Apple GPU cores
    gpu_cores_source: str | None = None  # "system_profiler" | "table"
    sm_count: int | None = None        # NVIDIA SMs / AMD CUs
    compute_capability: str | None = None
    hip_version: str | None = None
    peak_flops: float | None = None
    peak_flops_dtype: str = "fp32"     # "bf16" for GPUs, "fp32" for CPU
    peak_flops_source: str = "unknown"
    simulated: str | None = None       # AUTORESEARCH_SIMULATE_HARDWARE: recorded outputs of another machine

    def to_dict(self):
        return asdict(self)


# -----------------------------------------------------------------------------
# Pure parsers (text in, values out)

def parse_apple_chip(brand):
    """'Apple M3 Max' -> ('M3', 'max'); 'Apple M4' -> ('M4', 'base'); anything else -> (None, None)."""
    m = re.search(r"\bApple M(\d+)(?:\s+(Pro|Max|Ultra))?\b", brand or "", re.IGNORECASE)
    if not m:
        return None, None
    return f"M{m.group(1)}", (m.group(2) or "base").lower()


def parse_sysctl_memsize(text):
    """`sysctl -n hw.memsize` (bytes) -> GiB."""
    return int(text.strip()) / 2**30


def parse_system_profiler_gpu_cores(text):
    """GPU core count from `system_profiler SPDisplaysDataType` text or its `-json` output; None if absent."""
    text = (text or "").strip()
    if text.startswith("{"):
        for gpu in json.loads(text).get("SPDisplaysDataType", []):
            cores = str(gpu.get("sppci_cores", "")).strip()
            if cores.isdigit():
                return int(cores)
        return None
    m = re.search(r"Total Number of Cores:\s*(\d+)", text)
    return int(m.group(1)) if m else None


def parse_nvidia_smi(text):
    """`nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader` -> one dict per GPU."""
    gpus = []
    for line in (text or "").strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0]:
            continue
        mem = re.match(r"([\d.]+)\s*MiB", parts[1])
        cc = parts[2] if re.fullmatch(r"\d+\.\d+", parts[2]) else None
        gpus.append({"name": parts[0], "memory_gb": float(mem.group(1)) / 1024 if mem else 0.0,
                     "compute_capability": cc})
    return gpus


def parse_proc_cpuinfo(text):
    """/proc/cpuinfo -> {'model': str|None, 'vector_extensions': [...]} for x86 ('flags') and aarch64 ('Features')."""
    fields = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # first processor block is enough
            fields[key.strip()] = value.strip()
    model = fields.get("model name")
    if "flags" in fields:
        flags = set(fields["flags"].split())
        exts = [x for x in X86_EXTENSIONS if x in flags]
    else:
        words = set(fields.get("Features", "").split())
        exts = [name for word, name in ARM_EXTENSIONS.items() if word in words]
        if model is None and fields.get("CPU implementer") == "0x41":
            model = ARM_CPU_PARTS.get(fields.get("CPU part", "").lower())
    return {"model": model, "vector_extensions": exts}


def parse_darwin_cpu_features(text):
    """`sysctl hw.optional` (arm64: 'hw.optional.arm.FEAT_BF16: 1') or `sysctl -n machdep.cpu.features
    machdep.cpu.leaf7_features` (Intel Macs: 'AVX1.0 FMA ... AVX2 AVX512F') -> extension names."""
    text = text or ""
    if "hw.optional" in text:
        on = {k.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v.strip() == "1"}
        return [name for key, name in DARWIN_ARM_EXTENSIONS.items() if key in on]
    flags = {w.lower().replace("avx1.0", "avx").replace(".", "_") for w in text.split()}
    return [x for x in X86_EXTENSIONS if x in flags]


def gpu_peak_bf16(name):
    """Datasheet dense bf16 FLOP/s for a GPU name -> (flops, table label), or (None, None) if not in the table."""
    lowered = (name or "").lower()
    for pattern, label, flops in GPU_PEAK_BF16:
        if re.search(pattern, lowered):
            return flops, label
    return None, None


# -----------------------------------------------------------------------------
# Field builders: command outputs -> HardwareInfo fields (pure, so recorded outputs exercise the live code path)

def apple_fields(brand_text, memsize_text, displays_text=None):
    """HardwareInfo fields for Apple Silicon from `sysctl -n machdep.cpu.brand_string`, `sysctl -n hw.memsize` and
    `system_profiler SPDisplaysDataType` (text or -json). None if the brand is not an Apple M chip."""
    chip = (brand_text or "").strip()
    generation, tier = parse_apple_chip(chip)
    if generation is None:
        return None
    cores = parse_system_profiler_gpu_cores(displays_text) if displays_text else None
    cores_source = "system_profiler" if cores else None
    newest = max(APPLE_GPU_CORES, key=lambda g: int(g[1:]))
    if cores is None:
        cores = APPLE_GPU_CORES.get(generation, APPLE_GPU_CORES[newest])[tier]
        cores_source = "table"
    per_core_gen = generation if generation in APPLE_FLOPS_PER_CORE else newest
    per_core = APPLE_FLOPS_PER_CORE[per_core_gen]
    label = generation if per_core_gen == generation else f"{generation}, using {per_core_gen}'s figure"
    source = f"estimate: {cores} GPU cores x {per_core / 1e12:.2f} TFLOPS/core ({label})"
    if cores_source == "table":
        source += f"; core count guessed from the {generation} {tier} table"
    return {"kind": "apple", "chip_name": chip, "chip_generation": generation, "chip_tier": tier,
            "memory_gb": parse_sysctl_memsize(memsize_text), "memory_kind": "unified",
            "gpu_cores": cores, "gpu_cores_source": cores_source,
            "peak_flops": cores * per_core, "peak_flops_dtype": "bf16", "peak_flops_source": source}


def gpu_fields(name, memory_gb, compute_capability=None, sm_count=None, hip_version=None):
    """HardwareInfo fields for an NVIDIA or AMD GPU (from torch.cuda or nvidia-smi)."""
    flops, label = gpu_peak_bf16(name)
    return {"kind": "amd" if hip_version else "nvidia", "chip_name": name,
            "chip_generation": None if hip_version else NVIDIA_ARCH.get(compute_capability or ""),
            "chip_tier": None, "memory_gb": memory_gb, "memory_kind": "device", "sm_count": sm_count,
            "compute_capability": compute_capability, "hip_version": hip_version,
            "peak_flops": flops, "peak_flops_dtype": "bf16",
            "peak_flops_source": f"datasheet table: {label}" if label else "unknown"}


# -----------------------------------------------------------------------------
# Probes (run commands, read files)

def _run(*cmd):
    """stdout of a command, or None if it is missing, fails or hangs."""
    exe = shutil.which(cmd[0]) or next((p for p in (f"/usr/sbin/{cmd[0]}", f"/usr/bin/{cmd[0]}")
                                        if os.path.exists(p)), None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def is_apple_silicon():
    return sys.platform == "darwin" and platform.machine() == "arm64"


def probe_cpu():
    """Model, cores, system memory and vector extensions of the host CPU."""
    import psutil  # cheap, pure C extension; a project dependency
    model, exts = None, []
    if sys.platform == "darwin":
        model = (_run("sysctl", "-n", "machdep.cpu.brand_string") or "").strip() or None
        if platform.machine() == "arm64":
            exts = parse_darwin_cpu_features(_run("sysctl", "hw.optional"))
        else:
            exts = parse_darwin_cpu_features(_run("sysctl", "-n", "machdep.cpu.features",
                                                  "machdep.cpu.leaf7_features"))
    elif os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = parse_proc_cpuinfo(f.read())
        model, exts = info["model"], info["vector_extensions"]
    if model is None:
        lscpu = _run("lscpu") or ""
        m = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
        model = m.group(1).strip() if m else (platform.processor() or platform.machine() or "unknown CPU")
    if platform.machine().lower() in ("arm64", "aarch64") and "neon" not in exts:
        exts = ["neon", *exts]  # every 64-bit Arm core has it
    # Containers often pin a process to a few of the host's cores: count the ones we may actually use.
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        logical = min(logical, len(os.sched_getaffinity(0)))
    physical = psutil.cpu_count(logical=False)
    return {"cpu_model": model, "cpu_cores": logical,
            "cpu_physical_cores": min(physical, logical) if physical else None,
            "vector_extensions": exts, "system_memory_gb": psutil.virtual_memory().total / 2**30}


def nvidia_gpu_names():
    """The NVIDIA GPUs' model names in nvidia-smi's order (PCI bus order), [] without nvidia-smi."""
    return [g["name"] for g in parse_nvidia_smi(_run("nvidia-smi", "--query-gpu=name,memory.total,compute_cap",
                                                     "--format=csv,noheader"))]


def probe_gpu():
    """GPU fields from torch.cuda (NVIDIA or ROCm), else from nvidia-smi, else None."""
    try:
        import torch
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return gpu_fields(props.name, props.total_memory / 2**30, f"{props.major}.{props.minor}",
                              props.multi_processor_count, torch.version.hip)
    except (ImportError, RuntimeError):  # no torch, or a driver torch cannot talk to
        pass
    # torch missing, CPU-only torch, or a driver torch does not like: still describe the GPU.
    gpus = parse_nvidia_smi(_run("nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader"))
    if gpus:
        return gpu_fields(gpus[0]["name"], gpus[0]["memory_gb"], gpus[0]["compute_capability"])
    return None


# -----------------------------------------------------------------------------
# Measured CPU peak (fp32 and, with bf16 hardware, bf16 GEMMs) and compute dtype, cached on disk

def cache_dir():
    return Path(os.environ.get("AUTORESEARCH_CACHE_DIR") or Path.home() / ".cache" / "autoresearch")


def _write_json_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; this is a plain cache file
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _pretty_path(path):
    home = str(Path.home())
    return "~" + str(path)[len(home):] if str(path).startswith(home + os.sep) else str(path)


def _time_rounds(matmul, flop, rounds=CPU_PEAK_ROUNDS, reps=CPU_PEAK_REPS):
    """FLOP/s of each round (the best of `reps` calls of matmul(), which does `flop` FLOPs); the first call is a
    warm-up (thread pool, page faults)."""
    matmul()
    out = []
    for r in range(rounds):
        if r:
            time.sleep(CPU_PEAK_PAUSE_S)
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            matmul()
            best = min(best, time.perf_counter() - t0)
        out.append(flop / best)
    return out


def _gemm_library():
    """(cache key part, library description, make_matmul) for torch if installed, else numpy. make_matmul(m, k, n,
    dtype) allocates the operands and returns a closure doing one (m x k) @ (k x n) GEMM in dtype "fp32" or "bf16",
    or None if the library has no such GEMM (numpy: no bf16). A cache hit allocates nothing."""
    try:
        import torch
    except ImportError:
        import numpy as np

        def make_numpy_matmul(m, k, n, dtype):
            if dtype != "fp32":
                return None
            rng = np.random.default_rng(0)
            a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
            c = np.empty((m, n), dtype=np.float32)
            return lambda: np.matmul(a, b, out=c)
        return f"BLAS threads | numpy {np.__version__}", "numpy", make_numpy_matmul

    def make_torch_matmul(m, k, n, dtype):
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a, b, c = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt), torch.empty(m, n, dtype=dt)
        return lambda: torch.mm(a, b, out=c)
    threads = torch.get_num_threads()
    return f"{threads} threads | torch {torch.__version__}", f"torch, {threads} threads", make_torch_matmul


def _load_cache():
    path = cache_dir() / HARDWARE_CACHE_FILE
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    return path, cache if isinstance(cache, dict) else {}


def _save_cache(path, cache, section, key, entry, blockers):
    """Store entry under cache[section][key]; returns where it went, for the source string. A measurement taken
    while a training run was going is used by this process only."""
    if blockers:
        return f"just now, not cached: {', '.join(blockers)} was running"
    cache.setdefault(section, {})[key] = entry
    try:
        _write_json_atomic(path, cache)
        return f"just now, saved to {_pretty_path(path)}"
    except OSError as e:  # read-only home etc.: still usable, just re-measured next time
        return f"just now, not cached: {e.strerror or e}"


def training_runs_elsewhere():
    """'train.py (pid 123)' for every other process running a training script (not this process or its parents):
    a CPU measurement taken next to one would measure what is left of the CPU."""
    import psutil
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
        except (psutil.Error, OSError):
            continue
        if proc.info["pid"] in mine:
            continue
        script = next((os.path.basename(a) for a in cmdline[1:4] if os.path.basename(a) in TRAINING_SCRIPTS), None)
        if script:
            found.append(f"{script} (pid {proc.info['pid']})")
    return found


def _peak_override():
    override = os.environ.get("AUTORESEARCH_CPU_PEAK_FLOPS", "").strip()
    if not override:
        return None
    try:
        value = float(override)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"AUTORESEARCH_CPU_PEAK_FLOPS={override!r} is not a positive number of FLOP/s; "
                         "set it like 2.5e11, or unset it to measure")
    return value


def has_bf16_hardware(vector_extensions):
    return any(flag in (vector_extensions or ()) for flag in CPU_BF16_FLAGS)


_MEASURED = {}  # measurements this process made but could not cache (a training run was going), by cache key


def cpu_peak_entry(cpu_model=None, vector_extensions=None, refresh=False):
    """(entry, where) for this CPU: the cached measurement for this cpu model + thread count + library version, else a
    fresh one. entry: flops (best fp32 round), rounds_gflops, method, busy_percent, measured_at, and bf16 (the same
    for a bf16 GEMM where the CPU has bf16 hardware, else {"skipped": why})."""
    if cpu_model is None or vector_extensions is None:
        cpu = probe_cpu()
        cpu_model = cpu_model or cpu["cpu_model"]
        vector_extensions = cpu["vector_extensions"] if vector_extensions is None else vector_extensions
    key_suffix, library, make_matmul = _gemm_library()
    key = f"{cpu_model} | {key_suffix}"
    path, cache = _load_cache()
    entry = cache.get("cpu_peak_flops", {}).get(key)
    if not refresh and entry and entry.get("method_version") == CPU_PEAK_METHOD and entry.get("flops", 0) > 0:
        return entry, f"cached {_pretty_path(path)}"
    if not refresh and key in _MEASURED:
        return _MEASURED[key]
    # Other processes on the same cores make the GEMM look slow: record how busy the machine was just before, so a
    # low number can be explained. (We sleep during the sample, so it is everyone else's CPU use.)
    import psutil
    busy_percent = psutil.cpu_percent(interval=BUSY_SAMPLE_S)
    blockers = training_runs_elsewhere()
    n = CPU_GEMM_N
    how = f"with {library}, best of {CPU_PEAK_ROUNDS} rounds x {CPU_PEAK_REPS}"
    rounds = _time_rounds(make_matmul(n, n, n, "fp32"), 2 * n**3)
    entry = {"method_version": CPU_PEAK_METHOD, "method": f"{n}x{n} fp32 GEMM {how}", "flops": max(rounds),
             "gflops": round(max(rounds) / 1e9, 1), "rounds_gflops": [round(r / 1e9, 1) for r in rounds],
             "busy_percent": busy_percent, "measured_at": datetime.datetime.now().isoformat(timespec="seconds")}
    bf16 = make_matmul(n, n, n, "bf16") if has_bf16_hardware(vector_extensions) else None
    if bf16 is None:
        why = "no bf16 GEMM in " + library if has_bf16_hardware(vector_extensions) else \
            f"no {'/'.join(CPU_BF16_FLAGS)} in the CPU flags: bf16 would be emulated"
        entry["bf16"] = {"skipped": why}
    else:
        rounds = _time_rounds(bf16, 2 * n**3)
        entry["bf16"] = {"method": f"{n}x{n} bf16 GEMM {how}", "flops": max(rounds), "gflops": round(max(rounds) / 1e9, 1),
                         "rounds_gflops": [round(r / 1e9, 1) for r in rounds]}
    if blockers:
        entry["training_runs"] = blockers
    where = _save_cache(path, cache, "cpu_peak_flops", key, entry, blockers)
    if blockers:
        _MEASURED[key] = entry, where
    return entry, where


def measure_cpu_peak_flops(cpu_model=None, refresh=False, dtype="fp32", vector_extensions=None):
    """(FLOP/s, source) of this CPU in dtype "fp32" or "bf16": AUTORESEARCH_CPU_PEAK_FLOPS if set, else the measured
    peak (cpu_peak_entry). bf16 on a CPU without bf16 hardware: (None, why)."""
    override = _peak_override()
    if override:
        return override, "env: AUTORESEARCH_CPU_PEAK_FLOPS"
    entry, where = cpu_peak_entry(cpu_model, vector_extensions, refresh)
    measured = entry if dtype == "fp32" else entry.get("bf16", {})
    if not measured.get("flops"):
        return None, f"bf16 not measured: {measured.get('skipped', 'unknown')}"
    return float(measured["flops"]), f"measured: {measured['method']} ({where}){_busy_note(entry)}"


def peak_spread(entry):
    """'min 80.1 / median 95.3 / best 98.1 GFLOP/s over 5 rounds' for a cpu_peak_entry() or its bf16 part."""
    rounds = sorted(entry.get("rounds_gflops") or [])
    if not rounds:
        return "no rounds recorded"
    median = rounds[len(rounds) // 2] if len(rounds) % 2 else (rounds[len(rounds) // 2 - 1] + rounds[len(rounds) // 2]) / 2
    return f"min {rounds[0]:.1f} / median {median:.1f} / best {rounds[-1]:.1f} GFLOP/s over {len(rounds)} rounds"


def _busy_note(entry):
    busy = entry.get("busy_percent")
    if busy is None or busy < BUSY_PERCENT:
        return ""
    return f"; other processes were using {busy:.0f}% CPU: `python -m backends --remeasure` when idle"


def model_gemms(width, rows, vocab=8192):
    """(m, k, n) of a GPT's biggest forward GEMMs: the MLP's two and the lm_head (the largest at a small width)."""
    return [(rows, width, 4 * width), (rows, 4 * width, width), (rows, width, vocab)]


def choose_cpu_dtype(width, rows, cpu_model=None, vector_extensions=None, refresh=False):
    """("float32" | "bfloat16", why) to train a model of this width on the CPU, `rows` tokens per micro-batch.
    AUTORESEARCH_CPU_DTYPE=fp32|bf16 forces it. bf16 needs bf16 hardware in the CPU flags and the model's own GEMMs
    (model_gemms) at least CPU_BF16_MIN_SPEEDUP x faster in bf16 than in fp32; measured once per cpu + library +
    width + rows and cached with the peak."""
    forced = os.environ.get("AUTORESEARCH_CPU_DTYPE", "").strip().lower()
    if forced:
        if forced not in ("fp32", "bf16"):
            raise ValueError(f"AUTORESEARCH_CPU_DTYPE={forced!r}: use fp32 or bf16 (or unset it to measure)")
        return {"fp32": "float32", "bf16": "bfloat16"}[forced], "AUTORESEARCH_CPU_DTYPE"
    if cpu_model is None or vector_extensions is None:
        cpu = probe_cpu()
        cpu_model = cpu_model or cpu["cpu_model"]
        vector_extensions = cpu["vector_extensions"] if vector_extensions is None else vector_extensions
    if not has_bf16_hardware(vector_extensions):
        return "float32", f"no {'/'.join(CPU_BF16_FLAGS)} in the CPU flags (bf16 would be emulated)"
    key_suffix, library, make_matmul = _gemm_library()
    rows = min(rows, CPU_DTYPE_MAX_ROWS)
    key = f"{cpu_model} | {key_suffix} | width {width} | rows {rows}"
    path, cache = _load_cache()
    entry = cache.get("cpu_dtype", {}).get(key) or (None if refresh else _MEASURED.get(key))
    if refresh or not entry:
        if make_matmul(1, 1, 1, "bf16") is None:
            return "float32", f"no bf16 GEMM in {library}"
        seconds = {}
        for dtype in ("fp32", "bf16"):
            total = 0.0
            for m, k, n in model_gemms(width, rows):
                flop = 2 * m * k * n
                total += flop / max(_time_rounds(make_matmul(m, k, n, dtype), flop, rounds=3))
            seconds[dtype] = total
        speedup = seconds["fp32"] / seconds["bf16"]
        entry = {"dtype": "bfloat16" if speedup >= CPU_BF16_MIN_SPEEDUP else "float32", "speedup": round(speedup, 2),
                 "fp32_ms": round(seconds["fp32"] * 1e3, 2), "bf16_ms": round(seconds["bf16"] * 1e3, 2),
                 "method": f"MLP and lm_head GEMMs at width {width}, {rows} rows, with {library}, best of 3 rounds x "
                           f"{CPU_PEAK_REPS}",
                 "min_speedup": CPU_BF16_MIN_SPEEDUP,
                 "measured_at": datetime.datetime.now().isoformat(timespec="seconds")}
        blockers = training_runs_elsewhere()
        if blockers:
            entry["training_runs"] = blockers
            _MEASURED[key] = entry
        _save_cache(path, cache, "cpu_dtype", key, entry, blockers)
    return entry["dtype"], (f"measured: the model's GEMMs at width {width} ran in bf16 at {entry['speedup']:.2f}x "
                            f"fp32's speed; bf16 needs {entry['min_speedup']:g}x")

# -----------------------------------------------------------------------------
# HardwareInfo

_HARDWARE_INFO = None


def simulated_fields(path):
    """HardwareInfo fields of another machine from its recorded command outputs (tests/fixtures/hardware): a
    directory of an Apple machine's sysctl-brand_string.txt, sysctl-memsize.txt and optional system_profiler.{txt,json}
    and sysctl-hw.optional.txt; an `nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader` file
    (nvidia-smi*.csv); or a /proc/cpuinfo (cpuinfo*.txt). What the recording lacks is this machine's."""
    p = Path(path)
    read = lambda name: (p / name).read_text() if (p / name).exists() else None
    if p.is_dir() and read("sysctl-brand_string.txt") and read("sysctl-memsize.txt"):
        fields = apple_fields(read("sysctl-brand_string.txt"), read("sysctl-memsize.txt"),
                              read("system_profiler.json") or read("system_profiler.txt"))
        if fields:
            fields.update(platform="darwin", machine="arm64")
            if read("sysctl-hw.optional.txt"):
                fields["vector_extensions"] = parse_darwin_cpu_features(read("sysctl-hw.optional.txt"))
            return fields
    elif p.is_file() and p.name.startswith("nvidia-smi"):
        gpus = parse_nvidia_smi(p.read_text())
        if gpus:
            return gpu_fields(gpus[0]["name"], gpus[0]["memory_gb"], gpus[0]["compute_capability"])
    elif p.is_file() and p.name.startswith("cpuinfo"):
        info = parse_proc_cpuinfo(p.read_text())
        return {"kind": "cpu", "chip_name": info["model"] or "unknown CPU", "vector_extensions": info["vector_extensions"]}
    raise ValueError(f"{SIMULATE_ENV}={path!r} is not a recorded machine: an Apple directory with "
                     "sysctl-brand_string.txt and sysctl-memsize.txt, an nvidia-smi*.csv or a cpuinfo*.txt")


def _detect():
    cpu = probe_cpu()
    hw = HardwareInfo(platform=sys.platform, machine=platform.machine(), kind="cpu", chip_name=cpu["cpu_model"],
                      memory_gb=cpu["system_memory_gb"], memory_kind="system", cpu_model=cpu["cpu_model"],
                      cpu_cores=cpu["cpu_cores"], cpu_physical_cores=cpu["cpu_physical_cores"],
                      vector_extensions=cpu["vector_extensions"])
    simulated = os.environ.get(SIMULATE_ENV, "").strip()
    if simulated:
        hw = replace(hw, **simulated_fields(simulated), simulated=simulated)
        if hw.kind != "cpu":
            return hw
        # a recorded CPU's flags, this CPU's speed: measured under this CPU's name, so the cache stays right
        flops, source = measure_cpu_peak_flops(cpu["cpu_model"], vector_extensions=cpu["vector_extensions"])
        return replace(hw, peak_flops=flops, peak_flops_dtype="fp32", peak_flops_source=source)
    if is_apple_silicon():
        fields = apple_fields(_run("sysctl", "-n", "machdep.cpu.brand_string"), _run("sysctl", "-n", "hw.memsize"),
                              _run("system_profiler", "SPDisplaysDataType"))
        if fields:
            return replace(hw, **fields)
    if sys.platform != "darwin":
        fields = probe_gpu()
        if fields:
            return replace(hw, **fields)
    flops, source = measure_cpu_peak_flops(hw.cpu_model, vector_extensions=hw.vector_extensions)
    return replace(hw, peak_flops=flops, peak_flops_dtype="fp32", peak_flops_source=source)


def get_hardware_info(refresh=False):
    """Detect the machine once per process (refresh=True re-detects). The CPU peak comes from the disk cache."""
    global _HARDWARE_INFO
    if _HARDWARE_INFO is None or refresh:
        _HARDWARE_INFO = _detect()
    return _HARDWARE_INFO


def get_peak_flops(hw, backend=None, dtype="fp32", with_source=False):
    """Peak FLOP/s for MFU on the backend that trains: backend="cpu" (or MLX without Metal) gives the CPU's measured
    peak in the compute dtype ("fp32" | "bf16") also on a machine with a GPU; otherwise the hardware's peak.
    with_source=True: (flops, where the figure comes from)."""
    if backend == "cpu" and (hw.kind != "cpu" or dtype != "fp32"):
        flops, source = measure_cpu_peak_flops(hw.cpu_model, dtype=dtype, vector_extensions=hw.vector_extensions)
        if flops is None:  # no bf16 peak: fall back to fp32's
            flops, source = measure_cpu_peak_flops(hw.cpu_model, vector_extensions=hw.vector_extensions)
    else:
        flops, source = hw.peak_flops, hw.peak_flops_source
    return (flops, source) if with_source else flops


# -----------------------------------------------------------------------------
# Backend choice

def _mlx_problem(need_gpu=False):
    """None if MLX can run here, else why not and what to do."""
    try:
        import mlx.core as mx
    except ImportError as e:
        if is_apple_silicon():
            hint = "run `uv sync` (MLX ships with the project on Apple Silicon)"
        elif sys.platform == "linux":
            hint = "install its CPU build with `uv pip install 'mlx[cpu]'`"
        else:
            hint = f"MLX has no build for {sys.platform} {platform.machine()}; use AUTORESEARCH_BACKEND=cpu"
        return f"`import mlx.core` failed ({e}); {hint}"
    if need_gpu and not (mx.is_available(mx.gpu) if hasattr(mx, "is_available") else mx.metal.is_available()):
        return "MLX sees no Metal GPU; use AUTORESEARCH_BACKEND=mps or cpu"
    return None


def _torch_problem():
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"PyTorch is not installed ({e}); run `uv sync`"
    return None


def _mps_problem():
    if sys.platform != "darwin":
        return (f"MPS is PyTorch's Apple-GPU backend and exists only on macOS (this is {sys.platform} "
                f"{platform.machine()}); unset AUTORESEARCH_BACKEND or set AUTORESEARCH_BACKEND=cpu")
    problem = _torch_problem()
    if problem:
        return problem
    import torch
    if not torch.backends.mps.is_built():
        return f"torch {torch.__version__} was built without MPS; reinstall it with `uv sync`"
    if not torch.backends.mps.is_available():
        return ("torch.backends.mps.is_available() is False (MPS needs Apple Silicon and macOS 12.3+); "
                "use AUTORESEARCH_BACKEND=mlx or cpu")
    return None


def _cuda_problem():
    problem = _torch_problem()
    if problem:
        return problem
    import torch
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None and torch.version.hip is None:
        return (f"torch {torch.__version__} is a CPU-only build; install a CUDA or ROCm build "
                "(https://pytorch.org/get-started/locally/) or use AUTORESEARCH_BACKEND=cpu")
    runtime = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
    return (f"torch {torch.__version__} ({runtime}) sees no GPU (torch.cuda.is_available() is False); "
            "check `nvidia-smi` (or `rocm-smi`) and CUDA_VISIBLE_DEVICES, or use AUTORESEARCH_BACKEND=cpu")


def _cpu_problem():
    problem = _torch_problem()
    return f"{problem} (or use AUTORESEARCH_BACKEND=mlx with mlx[cpu])" if problem else None


_PROBLEM = {"mlx": _mlx_problem, "mps": _mps_problem, "cuda": _cuda_problem, "cpu": _cpu_problem}


def detect_backend():
    """'mlx' | 'mps' | 'cuda' | 'cpu', from AUTORESEARCH_BACKEND (default auto). Raises BackendUnavailable."""
    raw = os.environ.get("AUTORESEARCH_BACKEND", "")
    want = raw.strip().lower() or "auto"
    if want != "auto" and want not in BACKENDS:
        raise BackendUnavailable(f"AUTORESEARCH_BACKEND={raw!r} is not a backend; use one of: auto, "
                                 f"{', '.join(BACKENDS)}")
    if want != "auto":
        problem = _PROBLEM[want]()
        if problem:
            raise BackendUnavailable(f"AUTORESEARCH_BACKEND={want} but {problem}")
        return want
    if is_apple_silicon():
        if _mlx_problem(need_gpu=True) is None:
            return "mlx"
        if _mps_problem() is None:
            return "mps"
    elif _cuda_problem() is None:
        return "cuda"
    if _cpu_problem() is None:
        return "cpu"
    if _mlx_problem() is None:  # MLX-only install on a CPU machine
        return "mlx"
    raise BackendUnavailable(f"no training backend can run here: {_cpu_problem()}")


def training_script_for(backend):
    return "train_mlx.py" if backend == "mlx" else "train.py"


# -----------------------------------------------------------------------------
# Device helpers used by the training loops

def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of: {', '.join(BACKENDS)}")


def sync_device(backend):
    """Wait for queued device work, so wall-clock timings measure the work and not the queueing."""
    _check_backend(backend)
    if backend == "cuda":
        import torch
        torch.cuda.synchronize()
    elif backend == "mps":
        import torch
        torch.mps.synchronize()
    elif backend == "mlx":
        import mlx.core as mx
        if hasattr(mx, "synchronize"):
            mx.synchronize()


def get_peak_memory_mb(backend):
    """Peak memory of the training process/device in MiB."""
    _check_backend(backend)
    if backend == "cuda":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    if backend == "mps":
        import torch
        # MPS has no peak-allocation API: this is the current driver allocation, taken near the end of training.
        return torch.mps.driver_allocated_memory() / 2**20
    if backend == "mlx":
        import mlx.core as mx
        peak = mx.get_peak_memory if hasattr(mx, "get_peak_memory") else mx.metal.get_peak_memory  # older mlx
        return peak() / 2**20
    try:
        import resource
    except ImportError:  # Windows: no getrusage, report current RSS
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10  # bytes on macOS, KiB on Linux


# -----------------------------------------------------------------------------
# Summary

def format_flops(flops):
    if flops is None:
        return "unknown"
    for scale, unit in ((1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s")):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops:.3g} FLOP/s"


def print_hardware_summary(hw=None):
    hw = hw or get_hardware_info()
    detail = {"apple": f"Apple Silicon, {hw.chip_generation} {hw.chip_tier}",
              "nvidia": f"NVIDIA GPU{', ' + hw.chip_generation if hw.chip_generation else ''}",
              "amd": "AMD GPU (ROCm)", "cpu": "CPU only"}[hw.kind]
    print(f"Hardware: {hw.chip_name} ({detail})")
    if hw.simulated:
        print(f"  Simulated: recorded outputs from {hw.simulated} ({SIMULATE_ENV}); the rest is this machine")
    print(f"  Memory: {hw.memory_gb:.1f} GB {hw.memory_kind}")
    if hw.gpu_cores is not None:
        how = "from system_profiler" if hw.gpu_cores_source == "system_profiler" else "guessed from table"
        print(f"  GPU cores: {hw.gpu_cores} ({how})")
    if hw.kind in ("nvidia", "amd"):
        gpu = [f"{hw.sm_count} {'CUs' if hw.kind == 'amd' else 'SMs'}" if hw.sm_count else None,
               f"compute capability {hw.compute_capability}" if hw.compute_capability else None,
               f"HIP {hw.hip_version}" if hw.hip_version else None]
        if any(gpu):
            print(f"  GPU: {', '.join(g for g in gpu if g)}")
    physical = f" / {hw.cpu_physical_cores} physical" if hw.cpu_physical_cores else ""
    print(f"  CPU: {hw.cpu_model}, {hw.cpu_cores} logical{physical} cores")
    print(f"  Vector extensions: {', '.join(hw.vector_extensions) or 'none detected'}")
    print(f"  Peak {hw.peak_flops_dtype}: {format_flops(hw.peak_flops)} ({hw.peak_flops_source})")
