"""The slots of --workers N / --devices LIST: which device each slot trains on, and the environment that pins it there.

    --devices cuda:0,cuda:1    one slot per device; each run sees only its GPU (CUDA_VISIBLE_DEVICES, or
                               HIP_VISIBLE_DEVICES for rocm:K), so the trainer's "cuda" is that device; CUDA
                               numbers them in nvidia-smi's order (CUDA_DEVICE_ORDER=PCI_BUS_ID)
    --workers N (no devices)   N slots on the same machine; on a CPU they split the cores: each run gets
                               cores // N threads through the thread settings of the frameworks (OMP_NUM_THREADS,
                               which torch reads at import, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS, VECLIB_MAXIMUM_THREADS)

Results from different device classes are not comparable (a keep measured on one GPU model says nothing on another),
so one tag uses one class: devices_problem() says which devices were mixed. The class is what comes before ":"
("cuda:1" -> cuda); NVIDIA GPUs of different models are told apart by their nvidia-smi names (gpu_models_problem).
"""

import os
from dataclasses import dataclass, field

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
VISIBLE_VAR = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES"}
ORDER = {"cuda": {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}}  # CUDA's default order (fastest first) is not nvidia-smi's


@dataclass(frozen=True)
class SlotPlan:
    id: int  # 1-based, as the user sees it ("[slot 2]")
    device: str  # "cuda:1", "cpu", ...
    env: dict = field(default_factory=dict, hash=False)  # added to the run's environment

    @property
    def worker(self) -> str:
        """What the results' worker column says."""
        return f"slot {self.id} {self.device}"


def device_class(device: str) -> str:
    return device.split(":", 1)[0].strip().lower()


def parse_devices(devices) -> tuple:
    """'cuda:0, cuda:1' (or a sequence of names) -> ('cuda:0', 'cuda:1')."""
    text = devices if isinstance(devices, str) else ",".join(devices or ())
    return tuple(d.strip() for d in text.split(",") if d.strip())


def devices_problem(devices) -> str:
    """One line when the devices mix classes or repeat one; "" when they can share a tag."""
    classes = sorted({device_class(d) for d in devices})
    if len(classes) > 1:
        listed = ", ".join(f"{d} ({device_class(d)})" for d in devices)
        return (f"--devices mixes device classes: {listed}; results of different devices are not comparable: give "
                f"devices of one class (e.g. --devices {','.join(d for d in devices if device_class(d) == classes[0])})")
    repeated = sorted({d for d in devices if list(devices).count(d) > 1})
    if repeated:
        return f"--devices names {', '.join(repeated)} more than once: give each device once"
    return ""


def gpu_models_problem(devices, names: list) -> str:
    """One line when the cuda:K devices are GPUs of different models (names: nvidia-smi's, in its order)."""
    models = {}
    for d in devices:
        cls, _, index = d.partition(":")
        if cls.lower() == "cuda" and index.isdigit() and int(index) < len(names):
            models[d] = names[int(index)]
    if len(set(models.values())) <= 1:
        return ""
    listed = ", ".join(f"{d} ({m})" for d, m in models.items())
    return (f"--devices mixes GPU models: {listed}; results of different GPUs are not comparable: give GPUs of one "
            f"model")


def shared_device_problem(workers: int, devices, backend: str | None, apple: bool) -> str:
    """One line when --workers N (no --devices) would put every local slot on one accelerator: the runs would slow
    each other down and measure that. CPU slots split the cores instead; devices name one accelerator per slot."""
    if workers <= 1 or devices:
        return ""
    if apple and backend in ("mlx", "mps"):
        return (f"--workers {workers} on Apple Silicon: every slot would train on the one GPU; run one slot per Mac "
                f"(for more Macs: --executor ray, one node per Mac)")
    if backend == "cuda":
        return (f"--workers {workers} without --devices on a CUDA machine: every slot would train on cuda:0; name "
                f"one GPU per slot, e.g. --devices {','.join(f'cuda:{i}' for i in range(workers))}")
    return ""


def plan_slots(workers: int, devices=(), cpu_count: int | None = None) -> list:
    """The slots, in order. With devices, one per device; otherwise `workers` slots sharing the machine's cores."""
    if devices:
        plans = []
        for i, d in enumerate(devices, 1):
            cls, _, index = d.partition(":")
            env = {VISIBLE_VAR[cls.lower()]: index, **ORDER.get(cls.lower(), {})} if (
                cls.lower() in VISIBLE_VAR and index) else {}
            plans.append(SlotPlan(i, d, env))
        return plans
    if workers <= 1:
        return [SlotPlan(1, "local")]
    cores = cpu_count or os.cpu_count() or 1
    threads = str(max(1, cores // workers))
    return [SlotPlan(i, "cpu", {v: threads for v in THREAD_VARS}) for i in range(1, workers + 1)]
