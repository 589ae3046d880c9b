"""Live memory for the dashboard's hardware panel: the training process together with everything it spawned, the
system (or unified) memory, and GPU memory where the platform reports it.

- Trainer: the sum over the process and all its children (dataloader workers, compile helpers). On macOS it is the
  physical footprint (what Activity Monitor shows), which counts the process's Metal buffers in unified memory; RSS
  alone misses them. Elsewhere it is RSS (shared pages are counted once per process, so it can overstate a little).
- System: total minus available (what other programs cannot have), labelled "unified" on Apple Silicon.
- NVIDIA: nvidia-smi for used/total per GPU, and per-process GPU memory matched against the trainer's process tree.

psutil and the standard library only (no textual): a MemoryMonitor samples on its own thread and hands each
MemorySample to a callback.
"""

import ctypes
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import psutil

SAMPLE_SECONDS = 2.0
NVIDIA_SMI_TIMEOUT = 5.0
MIB = 1 << 20

# ---------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------


@dataclass
class GpuMemory:
    name: str
    used: int  # bytes
    total: int  # bytes


@dataclass
class MemorySample:
    system_used: int  # bytes
    system_total: int  # bytes
    trainer: int | None = None  # bytes held by the trainer's process tree; None when no trainer runs
    trainer_procs: int = 0
    trainer_peak: int | None = None  # the largest `trainer` seen for the current pid
    trainer_gpu: int | None = None  # bytes of GPU memory the trainer's tree holds (NVIDIA accounting)
    gpus: list = field(default_factory=list)  # GpuMemory per device
    method: str = "rss"  # "rss" | "footprint"


# ---------------------------------------------------------------------------
# The trainer's process tree
# ---------------------------------------------------------------------------


class _RusageInfoV0(ctypes.Structure):
    # struct rusage_info_v0 from <sys/resource.h> (macOS): enough to reach ri_phys_footprint
    _fields_ = [("ri_uuid", ctypes.c_uint8 * 16), ("ri_user_time", ctypes.c_uint64),
                ("ri_system_time", ctypes.c_uint64), ("ri_pkg_idle_wkups", ctypes.c_uint64),
                ("ri_interrupt_wkups", ctypes.c_uint64), ("ri_pageins", ctypes.c_uint64),
                ("ri_wired_size", ctypes.c_uint64), ("ri_resident_size", ctypes.c_uint64),
                ("ri_phys_footprint", ctypes.c_uint64), ("ri_proc_start_abstime", ctypes.c_uint64),
                ("ri_proc_exit_abstime", ctypes.c_uint64)]


_libproc = None


def phys_footprint(pid: int) -> int | None:
    """macOS physical footprint of one process in bytes (includes its GPU allocations in unified memory)."""
    global _libproc
    if sys.platform != "darwin":
        return None
    try:
        if _libproc is None:
            _libproc = ctypes.CDLL("/usr/lib/libproc.dylib")
        info = _RusageInfoV0()
        if _libproc.proc_pid_rusage(int(pid), 0, ctypes.byref(info)) != 0:  # 0 = RUSAGE_INFO_V0
            return None
        return int(info.ri_phys_footprint)
    except (OSError, AttributeError, ValueError):
        return None


def process_tree(pid: int) -> list:
    """The process and all its live descendants ([] when it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in procs if _alive(p)]


def _alive(p) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tree_memory(pid: int) -> tuple[int, int, str] | None:
    """(bytes, process count, method) for the process tree rooted at pid; None when the process is gone."""
    procs = process_tree(pid)
    if not procs:
        return None
    total, method = 0, "rss"
    for p in procs:
        footprint = phys_footprint(p.pid)
        if footprint is not None:
            total, method = total + footprint, "footprint"
            continue
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total, len(procs), method


def system_memory() -> tuple[int, int]:
    vm = psutil.virtual_memory()
    return vm.total - vm.available, vm.total


# ---------------------------------------------------------------------------
# NVIDIA
# ---------------------------------------------------------------------------


def _mib(text: str) -> int | None:
    try:
        return int(float(text.strip()) * MIB)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_nvidia_gpus(text: str) -> list:
    """`nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader,nounits` -> [GpuMemory]."""
    gpus = []
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3:
            continue
        used, total = _mib(parts[1]), _mib(parts[2])
        if used is not None and total:
            gpus.append(GpuMemory(parts[0], used, total))
    return gpus


def parse_nvidia_apps(text: str) -> dict:
    """`nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` -> {pid: bytes}."""
    out = {}
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        used = _mib(parts[1])
        if used is not None:
            out[int(parts[0])] = out.get(int(parts[0]), 0) + used
    return out


def _nvidia_smi(*args) -> str | None:
    try:
        p = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def nvidia_memory(pids=()) -> tuple[list, int | None]:
    """(GpuMemory per device, bytes the given pids hold on the GPUs or None if none of them shows up)."""
    gpus = parse_nvidia_gpus(_nvidia_smi("--query-gpu=name,memory.used,memory.total", "--format=csv,noheader,nounits"))
    mine = None
    if gpus and pids:
        apps = parse_nvidia_apps(_nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"))
        held = [apps[p] for p in pids if p in apps]  # in a container the pid namespace may differ: then no match
        mine = sum(held) if held else None
    return gpus, mine


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


def sample(pid: int | None = None, nvidia: bool = False) -> MemorySample:
    used, total = system_memory()
    s = MemorySample(system_used=used, system_total=total)
    pids = []
    if pid:
        tree = tree_memory(pid)
        if tree is not None:
            s.trainer, s.trainer_procs, s.method = tree
            pids = [p.pid for p in process_tree(pid)]
    if nvidia:
        s.gpus, s.trainer_gpu = nvidia_memory(pids)
    return s


class MemoryMonitor:
    """Samples every `interval` seconds on a daemon thread and calls callback(MemorySample) from that thread.
    Set .pid to the training process (None when none runs); the peak restarts with each new pid."""

    def __init__(self, callback, interval: float = SAMPLE_SECONDS, nvidia: bool | None = None):
        self.callback = callback
        self.interval = interval
        self.nvidia = shutil.which("nvidia-smi") is not None if nvidia is None else nvidia
        self.pid: int | None = None
        self._peak_pid = None
        self._peak: int | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "MemoryMonitor":
        self._thread = threading.Thread(target=self._loop, name="memory-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def poke(self) -> None:
        """Sample now (e.g. right after a trainer started)."""
        self._wake.set()

    def sample_once(self) -> MemorySample:
        pid = self.pid
        s = sample(pid, self.nvidia)
        if pid != self._peak_pid:
            self._peak_pid, self._peak = pid, None
        if s.trainer is not None:
            self._peak = max(self._peak or 0, s.trainer)
        s.trainer_peak = self._peak
        return s

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                s = self.sample_once()
            except Exception:  # a sampling hiccup (permissions, a process vanishing) must not end the monitor
                s = None
            if s is not None and not self._stop.is_set():
                try:
                    self.callback(s)
                except Exception:
                    pass
            self._wake.wait(self.interval)
            self._wake.clear()
