"""backends: hardware parsers on recorded command outputs, backend choice, the measured+cached CPU peak, tier
defaults, and `python -m backends` end to end."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends import (BackendUnavailable, HardwareInfo, detect_backend, get_hardware_info,
                      get_peak_flops, get_peak_memory_mb, print_hardware_summary, suggest_hyperparameters,
                      sync_device, training_script_for)
from backends import hardware

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hardware"
ON_PLAIN_CPU = sys.platform == "linux" and shutil.which("nvidia-smi") is None and not os.path.exists("/dev/kfd")


def fixture(*parts):
    return (FIXTURES.joinpath(*parts)).read_text()


def apple(machine, profiler=None):
    """Apple HardwareInfo fields from a recorded machine directory (profiler: None, 'txt' or 'json')."""
    displays = fixture(machine, f"system_profiler.{profiler}") if profiler else None
    return hardware.apple_fields(fixture(machine, "sysctl-brand_string.txt"), fixture(machine, "sysctl-memsize.txt"),
                                 displays)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No AUTORESEARCH_* settings from the developer's shell; a private cache dir."""
    for var in list(os.environ):
        if var.startswith("AUTORESEARCH_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "_HARDWARE_INFO", None)  # detection done here must not leak into later tests
    monkeypatch.setattr(hardware, "_MEASURED", {})
    return tmp_path / "cache"


def run_module(env_extra, cwd=ROOT, args=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "backends", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


# -----------------------------------------------------------------------------
# Apple Silicon (recorded sysctl / system_profiler outputs)

@pytest.mark.parametrize("machine, generation, tier, memory_gb, table_cores", [
    ("m1", "M1", "base", 8, 8),
    ("m3-max-30c", "M3", "max", 36, 40),
    ("m3-max-40c", "M3", "max", 64, 40),
    ("m4-pro", "M4", "pro", 24, 20),
    ("m5-max", "M5", "max", 128, 40),
    ("m2-ultra", "M2", "ultra", 192, 76),
])
def test_apple_chip_memory_and_table_fallback(machine, generation, tier, memory_gb, table_cores):
    f = apple(machine)
    assert (f["kind"], f["chip_generation"], f["chip_tier"]) == ("apple", generation, tier)
    assert f["memory_gb"] == memory_gb and f["memory_kind"] == "unified"
    assert (f["gpu_cores"], f["gpu_cores_source"]) == (table_cores, "table")
    assert f["peak_flops"] == pytest.approx(table_cores * hardware.APPLE_FLOPS_PER_CORE[generation])
    assert f["peak_flops_dtype"] == "bf16" and "guessed" in f["peak_flops_source"]


@pytest.mark.parametrize("profiler", ["txt", "json"])
def test_binned_m3_max_real_core_count_beats_table(profiler):
    # Same brand string "Apple M3 Max"; only system_profiler tells the 30-core part from the 40-core one.
    f30, f40 = apple("m3-max-30c", profiler), apple("m3-max-40c", profiler)
    assert f30["chip_name"] == f40["chip_name"] == "Apple M3 Max"
    assert (f30["gpu_cores"], f30["gpu_cores_source"]) == (30, "system_profiler")
    assert (f40["gpu_cores"], f40["gpu_cores_source"]) == (40, "system_profiler")
    assert f30["peak_flops"] == pytest.approx(30 * 0.65e12)
    assert f40["peak_flops"] == pytest.approx(40 * 0.65e12)
    assert f30["peak_flops_source"] == "estimate: 30 GPU cores x 0.65 TFLOPS/core (M3)"
    assert apple("m3-max-30c")["gpu_cores"] == 40  # what the table alone would have claimed


def test_binned_m1_and_future_chip():
    assert apple("m1", "txt")["gpu_cores"] == 7
    f = hardware.apple_fields("Apple M7 Ultra\n", "549755813888\n")
    assert (f["chip_generation"], f["chip_tier"], f["memory_gb"]) == ("M7", "ultra", 512)
    assert f["peak_flops"] == pytest.approx(80 * hardware.APPLE_FLOPS_PER_CORE["M5"])  # newest known figure
    assert "using M5" in f["peak_flops_source"]
    assert hardware.apple_fields("Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz\n", "34359738368\n") is None


def test_apple_cpu_features_from_sysctl():
    assert hardware.parse_darwin_cpu_features(fixture("m4-pro", "sysctl-hw.optional.txt")) == \
        ["neon", "dotprod", "i8mm", "bf16", "sme", "sme2"]


# -----------------------------------------------------------------------------
# NVIDIA / AMD

def test_nvidia_smi_h100():
    gpus = hardware.parse_nvidia_smi(fixture("nvidia-smi-h100.csv"))
    assert len(gpus) == 2
    assert gpus[0] == {"name": "NVIDIA H100 80GB HBM3", "memory_gb": pytest.approx(79.65, abs=0.01),
                       "compute_capability": "9.0"}
    f = hardware.gpu_fields(**gpus[0])
    assert (f["kind"], f["chip_generation"], f["memory_kind"]) == ("nvidia", "Hopper", "device")
    assert f["peak_flops"] == 989e12 and f["peak_flops_source"] == "datasheet table: H100 SXM"
    cfg = suggest_hyperparameters(HardwareInfo(**f))
    assert cfg == dict(depth=8, device_batch_size=128, total_batch_size=2**19, tier="cuda-80gb")  # upstream's


def test_nvidia_smi_unknown_gpu():
    (gpu,) = hardware.parse_nvidia_smi(fixture("nvidia-smi-unknown.csv"))
    f = hardware.gpu_fields(**gpu)
    assert (f["chip_name"], f["compute_capability"], f["chip_generation"]) == ("Tesla T4", "7.5", "Turing")
    assert f["peak_flops"] is None and f["peak_flops_source"] == "unknown"
    assert suggest_hyperparameters(HardwareInfo(**f))["tier"] == "cuda-12gb"  # 15 GB card


@pytest.mark.parametrize("name, label", [
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA B200", "B200"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce RTX 5090", "RTX 5090"),
    ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada"),
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "RTX PRO 6000 Blackwell"),
    ("AMD Instinct MI300X", "MI300X"),
    ("AMD Instinct MI325X", "MI325X"),
    ("AMD Instinct MI250X/MI250", "MI250X"),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_gpu_peak_table_matches_the_right_part(name, label):
    flops, got = hardware.gpu_peak_bf16(name)
    assert got == label
    assert (flops is None) == (label is None)


def test_amd_gpu_through_hip():
    f = hardware.gpu_fields("AMD Instinct MI300X", 191.98, "9.4", sm_count=304, hip_version="6.2.41133")
    assert (f["kind"], f["hip_version"], f["peak_flops"]) == ("amd", "6.2.41133", 1.3074e15)


# -----------------------------------------------------------------------------
# CPU

def test_cpuinfo_x86_avx2():
    info = hardware.parse_proc_cpuinfo(fixture("cpuinfo-x86-avx2.txt"))
    assert info["model"] == "AMD Ryzen 7 5800X 8-Core Processor"
    assert {"avx", "avx2", "fma"} <= set(info["vector_extensions"])
    assert not any(x.startswith(("avx512", "amx")) for x in info["vector_extensions"])


def test_cpuinfo_x86_avx512_amx():
    info = hardware.parse_proc_cpuinfo(fixture("cpuinfo-x86-avx512.txt"))
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"} <= set(info["vector_extensions"])


def test_cpuinfo_aarch64():
    info = hardware.parse_proc_cpuinfo(fixture("cpuinfo-aarch64.txt"))
    assert info["model"] == "Neoverse-V1"  # no "model name" line on aarch64: named from the CPU part
    assert info["vector_extensions"] == ["neon", "dotprod", "i8mm", "bf16", "sve"]


def test_cpu_peak_is_measured_in_rounds_then_cached(clean_env):
    if hardware.training_runs_elsewhere():
        pytest.skip(f"{hardware.training_runs_elsewhere()} running: the peak is not cached meanwhile")
    cache_file = clean_env / "hardware.json"
    # an entry of the old method (one burst of best-of-N) is measured again
    key = f"{hardware.probe_cpu()['cpu_model']} | {hardware._gemm_library()[0]}"
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(json.dumps({"cpu_peak_flops": {key: {"flops": 1.25e11, "gflops": 125.0}}}))
    t0 = time.perf_counter()
    flops, source = hardware.measure_cpu_peak_flops()
    first_s = time.perf_counter() - t0
    assert flops > 1e9 and flops != 1.25e11 and "saved to" in source
    assert source.startswith("measured: 2048x2048 fp32 GEMM with torch, ") and "best of 5 rounds x 2" in source
    entry = json.loads(cache_file.read_text())["cpu_peak_flops"][key]
    assert entry["flops"] == flops and len(entry["rounds_gflops"]) == hardware.CPU_PEAK_ROUNDS
    assert max(entry["rounds_gflops"]) == round(flops / 1e9, 1)  # the best round is the peak
    assert entry["method"] in source and entry["busy_percent"] >= 0 and entry["measured_at"]
    if hardware.has_bf16_hardware(hardware.probe_cpu()["vector_extensions"]):
        assert entry["bf16"]["flops"] > 1e9 and len(entry["bf16"]["rounds_gflops"]) == hardware.CPU_PEAK_ROUNDS
        assert hardware.measure_cpu_peak_flops(dtype="bf16")[0] == entry["bf16"]["flops"]
    else:
        assert "in the CPU flags" in entry["bf16"]["skipped"]
        assert hardware.measure_cpu_peak_flops(dtype="bf16")[0] is None
    before = (cache_file.stat().st_mtime_ns, cache_file.read_bytes())

    t0 = time.perf_counter()
    again, source = hardware.measure_cpu_peak_flops()
    second_s = time.perf_counter() - t0
    assert again == flops and "(cached " in source
    assert (cache_file.stat().st_mtime_ns, cache_file.read_bytes()) == before  # not re-measured, not rewritten
    assert second_s < first_s / 3
    # get_hardware_info reads the same cache
    hw = get_hardware_info(refresh=True)
    if hw.kind == "cpu":
        assert hw.peak_flops == flops and hw.peak_flops_dtype == "fp32"
    # A number measured while other processes were busy says so (and how to redo it).
    data = json.loads(cache_file.read_text())
    data["cpu_peak_flops"][key]["busy_percent"] = 90.0
    cache_file.write_text(json.dumps(data))
    assert hardware.measure_cpu_peak_flops()[1].endswith(
        "; other processes were using 90% CPU: `python -m backends --remeasure` when idle")


def test_cpu_peak_is_not_cached_while_a_training_run_is_going(clean_env, tmp_path):
    """Measured next to a training run, the peak is what the run leaves of the CPU: used by this process, never
    cached for the next runs."""
    (tmp_path / "train.py").write_text("import time; time.sleep(120)\n")
    run = subprocess.Popen([sys.executable, str(tmp_path / "train.py")])
    try:
        deadline = time.time() + 30
        while f"train.py (pid {run.pid})" not in hardware.training_runs_elsewhere() and time.time() < deadline:
            time.sleep(0.1)
        flops, source = hardware.measure_cpu_peak_flops()
        assert flops > 1e9 and "not cached: " in source and f"train.py (pid {run.pid})" in source
        assert not (clean_env / "hardware.json").exists()
        assert hardware.measure_cpu_peak_flops() == (flops, source)  # measured once per process
    finally:
        run.kill()
        run.wait()
    assert f"train.py (pid {run.pid})" not in hardware.training_runs_elsewhere()


def test_cpu_dtype_is_chosen_by_measurement(clean_env, monkeypatch):
    assert hardware.choose_cpu_dtype(64, 512, "Some CPU", ["avx", "avx2", "fma"]) == (
        "float32", "no amx_bf16/avx512_bf16/bf16 in the CPU flags (bf16 would be emulated)")
    assert not (clean_env / "hardware.json").exists()  # nothing to measure, nothing cached
    monkeypatch.setenv("AUTORESEARCH_CPU_DTYPE", "bf16")
    assert hardware.choose_cpu_dtype(64, 512, "Some CPU", ["avx2"]) == ("bfloat16", "AUTORESEARCH_CPU_DTYPE")
    monkeypatch.setenv("AUTORESEARCH_CPU_DTYPE", "fp16")
    with pytest.raises(ValueError, match="AUTORESEARCH_CPU_DTYPE='fp16': use fp32 or bf16"):
        hardware.choose_cpu_dtype(64, 512)
    monkeypatch.delenv("AUTORESEARCH_CPU_DTYPE")
    cpu = hardware.probe_cpu()
    if not hardware.has_bf16_hardware(cpu["vector_extensions"]):
        pytest.skip("this CPU has no bf16 hardware: fp32 without a measurement (checked above)")
    dtype, why = hardware.choose_cpu_dtype(128, 1024)
    cache_file = clean_env / "hardware.json"
    cached = json.loads(cache_file.read_text()).get("cpu_dtype", {}) if cache_file.exists() else {}
    # not cached while another training run is going: then this process keeps it
    (entry,) = list(cached.values()) or [v for k, v in hardware._MEASURED.items() if "width 128" in k]
    assert entry["speedup"] == pytest.approx(entry["fp32_ms"] / entry["bf16_ms"], rel=0.02)
    assert dtype == ("bfloat16" if entry["speedup"] >= hardware.CPU_BF16_MIN_SPEEDUP else "float32")
    assert why.startswith("measured: the model's GEMMs at width 128 ran in bf16 at ")
    assert hardware.choose_cpu_dtype(128, 1024) == (dtype, why)  # cached (or kept by this process)


def test_cpu_peak_env_override(clean_env, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CPU_PEAK_FLOPS", "2.5e11")
    assert hardware.measure_cpu_peak_flops() == (2.5e11, "env: AUTORESEARCH_CPU_PEAK_FLOPS")
    assert not (clean_env / "hardware.json").exists()
    apple_hw = HardwareInfo(kind="apple", cpu_model="Apple M3 Max", peak_flops=26e12)
    assert get_peak_flops(apple_hw) == 26e12
    assert get_peak_flops(apple_hw, backend="cpu") == 2.5e11  # AUTORESEARCH_BACKEND=cpu on a Mac
    monkeypatch.setenv("AUTORESEARCH_CPU_PEAK_FLOPS", "fast")
    with pytest.raises(ValueError, match=r"AUTORESEARCH_CPU_PEAK_FLOPS='fast' is not a positive number") as e:
        hardware.measure_cpu_peak_flops()
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not ON_PLAIN_CPU, reason="expects a Linux machine without a GPU")
def test_this_machine(clean_env, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CPU_PEAK_FLOPS", "1e11")
    hw = get_hardware_info(refresh=True)
    assert get_hardware_info() is hw  # cached per process
    assert (hw.platform, hw.kind, hw.memory_kind) == ("linux", "cpu", "system")
    assert hw.chip_name == hw.cpu_model and hw.cpu_model
    assert 1 <= hw.cpu_cores <= os.cpu_count() and hw.memory_gb > 0.5
    assert hw.peak_flops == 1e11 and hw.peak_flops_dtype == "fp32"
    d = hw.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert {"chip_generation", "chip_tier", "vector_extensions", "gpu_cores_source", "sm_count",
            "compute_capability", "hip_version", "peak_flops_source"} <= set(d)


# -----------------------------------------------------------------------------
# Backend choice

@pytest.mark.skipif(not ON_PLAIN_CPU, reason="expects a Linux machine without a GPU")
def test_detect_backend_here(clean_env, monkeypatch):
    assert detect_backend() == "cpu"
    monkeypatch.setenv("AUTORESEARCH_BACKEND", " CPU ")
    assert detect_backend() == "cpu"
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "mlx")  # MLX's CPU backend (mlx[cpu]) is installed here
    assert detect_backend() == "mlx"
    for forced, why in (("mps", "only on macOS"), ("cuda", "sees no GPU|CPU-only build")):
        monkeypatch.setenv("AUTORESEARCH_BACKEND", forced)
        with pytest.raises(BackendUnavailable, match=f"^AUTORESEARCH_BACKEND={forced} but .*({why})") as e:
            detect_backend()
        assert "\n" not in str(e.value) and "AUTORESEARCH_BACKEND=cpu" in str(e.value)


def test_unknown_backend_lists_valid_ones(clean_env, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "bogus")
    with pytest.raises(BackendUnavailable) as e:
        detect_backend()
    assert str(e.value) == "AUTORESEARCH_BACKEND='bogus' is not a backend; use one of: auto, mlx, mps, cuda, cpu"


def test_training_script_for():
    assert training_script_for("mlx") == "train_mlx.py"
    assert [training_script_for(b) for b in ("mps", "cuda", "cpu")] == ["train.py"] * 3


def test_device_helpers_on_cpu_and_mlx():
    import mlx.core as mx
    sync_device("cpu")
    assert get_peak_memory_mb("cpu") > 10  # the process's peak RSS (a Python with numpy is well over 10 MiB)
    x = mx.zeros((1024, 1024))  # 4 MiB
    mx.eval(x)
    sync_device("mlx")
    assert get_peak_memory_mb("mlx") >= 4
    with pytest.raises(ValueError, match="unknown backend 'metal'"):
        get_peak_memory_mb("metal")


# -----------------------------------------------------------------------------
# MLX on a CPU: the OpenBLAS preload and the loss head over the cores

def test_preload_openblas_choices(monkeypatch):
    import ctypes.util
    from backends.mlx_cpu import preload_openblas
    monkeypatch.setenv("AUTORESEARCH_OPENBLAS", "0")
    assert preload_openblas() is None
    libm = ctypes.util.find_library("m")  # any loadable library stands in for an OpenBLAS the user points at
    monkeypatch.setenv("AUTORESEARCH_OPENBLAS", libm)
    assert preload_openblas() == libm      # the user's choice comes before the system paths
    monkeypatch.setenv("AUTORESEARCH_OPENBLAS", "/nonexistent/libopenblas.so.0")
    found = preload_openblas()             # an unloadable choice falls through to the system's, if any
    assert found is None or "openblas" in found or "mkl_rt" in found
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("AUTORESEARCH_OPENBLAS", libm)
    assert preload_openblas() is None      # Metal builds of MLX use Accelerate


def test_preload_finds_mkl_installed_with_the_project(monkeypatch, tmp_path):
    """PyPI's mkl wheel puts libmkl_rt.so.* (and intel-openmp's libiomp5.so) into the environment's lib/: MLX on Linux
    uses it without any system package, and the startup line names it."""
    import ctypes.util
    from backends.mlx_cpu import blas_name, preload_openblas
    libm = ctypes.util.find_library("m")
    real = next(p for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib")
                for p in [os.path.join(d, libm)] if os.path.exists(p))
    (tmp_path / "lib").mkdir()
    shutil.copy(real, tmp_path / "lib" / "libmkl_rt.so.2")  # any loadable library stands in for MKL
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.delenv("AUTORESEARCH_OPENBLAS", raising=False)
    found = preload_openblas()
    assert found == str(tmp_path / "lib" / "libmkl_rt.so.2") and blas_name(found) == "MKL"


def test_mlx_exp_and_tanh_from_multiplies_and_adds_are_libms_to_a_few_ulp():
    """backends/mlx_cpu.py's exp_nonpositive and tanh (the head's, without MLX's per-float libm calls), eager and
    under mx.compile as the trainer runs them, against float64 NumPy over their whole range and its edges."""
    import mlx.core as mx
    import numpy as np
    from backends.mlx_cpu import exp_nonpositive, tanh
    a = np.concatenate([np.linspace(-80.0, 0.0, 400_001), -np.logspace(-12, 1, 2_001), [0.0, -0.5, -1e-30]])
    u = np.concatenate([np.linspace(-12.0, 12.0, 400_001), np.logspace(-12, 1, 2_001), -np.logspace(-12, 1, 2_001),
                        [0.0, 9.0, -9.0, 9.5, -9.5, 50.0, -50.0, 1e30, -1e30, 3e38, -3e38]])
    a, u = a.astype(np.float32), u.astype(np.float32)
    for fn in (lambda f, x: f(x), lambda f, x: mx.compile(f)(x)):
        got_exp = np.array(fn(exp_nonpositive, mx.array(a)), dtype=np.float64)
        assert np.abs(got_exp / np.exp(a.astype(np.float64)) - 1).max() < 2.5e-7
        got_tanh = np.array(fn(tanh, mx.array(u)), dtype=np.float64)
        assert np.abs(got_tanh - np.tanh(u.astype(np.float64))).max() < 2.5e-7
        assert ((np.sign(got_tanh) == np.sign(u)) | (got_tanh == 0)).all() and (np.abs(got_tanh) <= 1).all()
    edges = mx.array(np.array([np.inf, -np.inf, np.nan], dtype=np.float32))
    assert np.isnan(np.array(tanh(edges))).all()  # +-inf too: a logit that overflowed fp32 means a diverged run
    assert np.isnan(float(exp_nonpositive(mx.array(np.nan))))


def test_mlx_softcap_cross_entropy_of_a_diverged_model_is_nan():
    """A NaN in the logits (a run that diverged) must give a NaN loss, which the trainer stops on, not a number."""
    import mlx.core as mx
    import numpy as np
    from backends.mlx_cpu import CHUNK_ROWS, softcap_cross_entropy
    x = mx.array(np.ones((CHUNK_ROWS + 3, 8), dtype=np.float32))
    w = mx.array(np.where(np.arange(40 * 8).reshape(40, 8) == 17, np.nan, 0.1).astype(np.float32))
    y = mx.array(np.zeros(CHUNK_ROWS + 3, dtype=np.int64))
    assert np.isnan(float(softcap_cross_entropy(x, w, y, 15.0)))
    loss, grad = mx.value_and_grad(lambda w: softcap_cross_entropy(x, w, y, 15.0))(w)
    assert np.isnan(float(loss)) and np.isnan(np.array(grad)).any()


@pytest.mark.parametrize("cap", [15.0, 100.0])  # 100: exp(cap) overflows fp32 unless each row is shifted by its max
def test_mlx_softcap_cross_entropy_is_the_lines_it_replaces(cap):
    """backends/mlx_cpu.py's chunked head loss over rows that do not fill the last chunk, with ignored targets:
    the loss of every reduction and the gradients of the mean, against nn.losses.cross_entropy of the logits."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from backends.mlx_cpu import CHUNK_ROWS, head_streams, softcap_cross_entropy
    assert len(head_streams()) == min(4, os.cpu_count() or 1)  # mx.metal is unavailable here: the chunked path
    rng = np.random.default_rng(int(cap))
    rows = 3 * CHUNK_ROWS + 17
    x = mx.array((rng.standard_normal((rows, 1, 24)) * 3).astype(np.float32))
    w = mx.array((rng.standard_normal((300, 24)) * cap / 10).astype(np.float32))
    y_np = rng.integers(0, 300, (rows, 1))
    y_np[::5] = -1
    y, valid = mx.array(y_np), mx.array(y_np != -1)

    def plain(w, x, reduction):
        logits = cap * mx.tanh((x @ w.T).astype(mx.float32) / cap)
        loss = nn.losses.cross_entropy(logits, mx.maximum(y, 0), reduction="none") * valid
        return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / valid.sum()}[reduction]

    for reduction in ("none", "sum", "mean"):
        got, want = softcap_cross_entropy(x, w, y, cap, reduction), plain(w, x, reduction)
        assert got.shape == want.shape
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-6, atol=1e-5)
    grads = [mx.grad(lambda w, x: f(w, x), argnums=(0, 1))(w, x) for f in
             (lambda w, x: 3 * softcap_cross_entropy(x, w, y, cap), lambda w, x: 3 * plain(w, x, "mean"))]
    for got, want in zip(*grads):
        assert np.isfinite(np.array(got)).all()
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _softcapped_reference(x, w, y, cap, reduction="mean"):
    """train.py's three lines for the head's loss (in x's precision: no fp32 cast of float64 logits)."""
    import torch
    import torch.nn.functional as F
    logits = F.linear(x, w)
    logits = (logits.float() if logits.dtype != torch.float64 else logits) / cap
    return F.cross_entropy((cap * torch.tanh(logits)).flatten(0, -2), y.flatten(), ignore_index=-1,
                           reduction=reduction).view(y.shape if reduction == "none" else ())


@pytest.mark.parametrize("cap", [15.0, 100.0])
def test_softcap_cross_entropy_is_the_three_lines_it_replaces(cap):
    """Loss and gradients in float64 over rows that do not fill the last chunk, with ignored targets."""
    import torch
    from backends.loss_torch import CHUNK_ROWS, softcap_cross_entropy
    g = torch.Generator().manual_seed(0)
    rows = 2 * CHUNK_ROWS + 37
    x = (torch.randn(rows, 1, 24, generator=g, dtype=torch.float64) * 3).requires_grad_()
    w = (torch.randn(300, 24, generator=g, dtype=torch.float64) * cap / 10).requires_grad_()
    y = torch.randint(0, 300, (rows, 1), generator=g)
    y[::5] = -1
    for reduction in ("mean", "sum"):
        got = softcap_cross_entropy(x, w, y, cap, reduction)
        got_grads = torch.autograd.grad(3 * got, (x, w))
        want = _softcapped_reference(x, w, y, cap, reduction)
        want_grads = torch.autograd.grad(3 * want, (x, w))
        assert torch.isfinite(got) and abs(got - want) < 1e-10 * abs(want), (reduction, got, want)
        for a, b in zip(got_grads, want_grads):
            assert a.dtype == b.dtype and (a - b).abs().max() < 1e-12 * b.abs().max(), reduction
    with torch.no_grad():
        got, want = softcap_cross_entropy(x, w, y, cap, "none"), _softcapped_reference(x, w, y, cap, "none")
    assert got.shape == y.shape and (got - want).abs().max() < 1e-10 and (got[::5] == 0).all()
    got = softcap_cross_entropy(x, w, y, cap, "none")  # with gradients: per-row losses that feed more graph
    assert got.shape == y.shape and (got - want).abs().max() < 1e-5 and got.requires_grad


def test_softcap_cross_entropy_under_bf16_autocast_rounds_like_the_three_lines():
    """Under autocast the GEMMs run in bf16 as F.linear's would: the loss within fp32 rounding of the autocast
    reference, the gradients within bf16 rounding, and of the parameters' own dtypes."""
    import torch
    from backends.loss_torch import softcap_cross_entropy
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 128, 64, generator=g).requires_grad_()
    w = (torch.randn(1000, 64, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, 1000, (4, 128), generator=g)
    results = []
    for fn in (softcap_cross_entropy, _softcapped_reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(x, w, y, 15.0)
        results.append((loss, *torch.autograd.grad(loss, (x, w))))
    (loss, gx, gw), (ref, rgx, rgw) = results
    assert loss.dtype == ref.dtype == torch.float32 and abs(loss - ref) < 1e-5 * ref
    for a, b in ((gx, rgx), (gw, rgw)):
        assert a.dtype == b.dtype == torch.float32 and (a - b).norm() < 1e-2 * b.norm()
    with torch.no_grad():  # per position: the bf16 GEMM's rounding, not fp32's
        fp32 = _softcapped_reference(x, w, y, 15.0, "none")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, bf16 = softcap_cross_entropy(x, w, y, 15.0, "none"), _softcapped_reference(x, w, y, 15.0, "none")
    assert (got - bf16).abs().max() < 0.1 * (fp32 - bf16).abs().max()


def test_softcap_cross_entropy_does_not_overflow_fp32_at_a_large_cap():
    """exp(100) is beyond fp32: each row is shifted by its largest logit, as log_softmax does."""
    import torch
    from backends.loss_torch import softcap_cross_entropy
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(300, 16, generator=g) * 3).requires_grad_()
    w = (torch.randn(50, 16, generator=g) * 10).requires_grad_()
    y = torch.randint(0, 50, (300,), generator=g)
    got, want = softcap_cross_entropy(x, w, y, 100.0), _softcapped_reference(x, w, y, 100.0)
    assert torch.isfinite(got) and abs(got - want) < 1e-5 * want
    for a, b in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w))):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-4 * b.abs().max()


# -----------------------------------------------------------------------------
# Tier defaults

HW_FOR_TIER = {
    "apple-base": HardwareInfo(kind="apple", chip_tier="base", memory_gb=16),
    "apple-pro": HardwareInfo(kind="apple", chip_tier="pro", memory_gb=24),
    "apple-max": HardwareInfo(kind="apple", chip_tier="max", memory_gb=64),
    "apple-ultra": HardwareInfo(kind="apple", chip_tier="ultra", memory_gb=192),
    "cuda-80gb": HardwareInfo(kind="nvidia", memory_gb=79.2),   # "80 GB" H100 as torch reports it
    "cuda-40gb": HardwareInfo(kind="nvidia", memory_gb=39.4),   # A100 40GB
    "cuda-20gb": HardwareInfo(kind="nvidia", memory_gb=23.6),   # RTX 4090
    "cuda-12gb": HardwareInfo(kind="amd", memory_gb=15.98),     # 16 GB card
    "cuda-small": HardwareInfo(kind="nvidia", memory_gb=7.8),
    "cpu": HardwareInfo(kind="cpu", memory_gb=23.5),
}


@pytest.mark.parametrize("tier", list(HW_FOR_TIER))
@pytest.mark.parametrize("max_seq_len", [2048, 1024, 512, 256, 1000])
def test_every_tier_divides_evenly(tier, max_seq_len):
    cfg = suggest_hyperparameters(HW_FOR_TIER[tier], max_seq_len=max_seq_len)
    assert cfg["tier"] == tier
    micro = cfg["device_batch_size"] * max_seq_len
    assert cfg["total_batch_size"] % micro == 0 and cfg["total_batch_size"] >= micro


def test_tier_values():
    s = suggest_hyperparameters
    # Apple table: the published totals; base fits 2 rows of 2048 in its 4K tokens, and 4 rows of 512 twice
    assert s(HW_FOR_TIER["apple-base"]) == dict(depth=4, device_batch_size=2, total_batch_size=2**12, tier="apple-base")
    assert s(HW_FOR_TIER["apple-base"], 512) == dict(depth=4, device_batch_size=4, total_batch_size=2**12,
                                                     tier="apple-base")
    assert s(HW_FOR_TIER["apple-pro"]) == dict(depth=6, device_batch_size=4, total_batch_size=2**13, tier="apple-pro")
    assert s(HW_FOR_TIER["apple-max"]) == dict(depth=8, device_batch_size=16, total_batch_size=2**15, tier="apple-max")
    assert s(HW_FOR_TIER["apple-ultra"], 512) == dict(depth=10, device_batch_size=32, total_batch_size=2**16,
                                                      tier="apple-ultra")
    assert s(HW_FOR_TIER["cuda-40gb"]) == dict(depth=8, device_batch_size=64, total_batch_size=2**18, tier="cuda-40gb")
    assert s(HW_FOR_TIER["cpu"], 512) == dict(depth=2, device_batch_size=16, total_batch_size=16 * 512, tier="cpu")


@pytest.mark.parametrize("memory_gb, tier", [(8, "apple-base"), (16, "apple-base"), (18, "apple-pro"),
                                             (36, "apple-pro"), (48, "apple-max"), (96, "apple-max"),
                                             (128, "apple-ultra"), (512, "apple-ultra")])
def test_apple_tier_from_memory_when_chip_tier_unknown(memory_gb, tier):
    assert suggest_hyperparameters(HardwareInfo(kind="apple", memory_gb=memory_gb))["tier"] == tier


APPLE_TIER_TABLE = {  # machine: (tier, depth, device batch, total batch) at the apple profile's 2048 context
    "m1": ("apple-base", 4, 2, 4096), "m4-pro": ("apple-pro", 6, 4, 8192), "m3-max-30c": ("apple-max", 8, 16, 32768),
    "m3-max-40c": ("apple-max", 8, 16, 32768), "m5-max": ("apple-max", 8, 16, 32768),
    "m2-ultra": ("apple-ultra", 10, 32, 65536)}


@pytest.mark.parametrize("machine", list(APPLE_TIER_TABLE))
def test_python_m_backends_on_recorded_apple_machines(tmp_path, machine):
    """The tier table a Mac prints (simulated from its recorded sysctl/system_profiler outputs, MLX on this CPU):
    the published tokens per step, one micro-batch of at most the table's rows at the apple profile's context."""
    tier, depth, device_batch, total = APPLE_TIER_TABLE[machine]
    r = run_module({"AUTORESEARCH_CACHE_DIR": str(tmp_path), "AUTORESEARCH_BACKEND": "mlx",
                    "AUTORESEARCH_SIMULATE_HARDWARE": str(FIXTURES / machine)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"  Simulated: recorded outputs from {FIXTURES / machine}" in r.stdout
    assert "Evaluation profile: apple (max_seq_len 2048, eval_tokens 5,242,880; follows the mlx backend)" in r.stdout
    accum = total // (device_batch * 2048)
    assert (f"Suggested config (tier {tier}, max_seq_len 2048):\n  Depth: {depth}\n  Device batch size: {device_batch}\n"
            f"  Total batch size: {total:,} tokens ({accum} micro-batch{'es' if accum > 1 else ''} per step)") in r.stdout


def test_python_m_backends_cpu_backend_on_a_gpu_machine(tmp_path):
    """AUTORESEARCH_BACKEND=cpu on a (recorded) H100 machine: the cpu tier, the cpu profile and the CPU's own peak."""
    r = run_module({"AUTORESEARCH_CACHE_DIR": str(tmp_path), "AUTORESEARCH_BACKEND": "cpu",
                    "AUTORESEARCH_CPU_PEAK_FLOPS": "1e11", "AUTORESEARCH_CPU_DTYPE": "fp32",
                    "AUTORESEARCH_SIMULATE_HARDWARE": str(FIXTURES / "nvidia-smi-h100.csv")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Hardware: NVIDIA H100 80GB HBM3 (NVIDIA GPU, Hopper)" in r.stdout
    assert "Evaluation profile: cpu (max_seq_len 512, eval_tokens 131,072; follows the cpu backend)" in r.stdout
    assert "Suggested config (tier cpu, max_seq_len 512):" in r.stdout
    assert "  CPU compute dtype: fp32 (AUTORESEARCH_CPU_DTYPE)" in r.stdout
    r = run_module({"AUTORESEARCH_CACHE_DIR": str(tmp_path), "AUTORESEARCH_SIMULATE_HARDWARE": str(tmp_path)})
    assert r.returncode == 2 and r.stdout.startswith("error: AUTORESEARCH_SIMULATE_HARDWARE=") and not r.stderr


def test_backend_decides_the_table_when_it_differs_from_the_hardware():
    assert suggest_hyperparameters(HW_FOR_TIER["apple-max"], backend="cpu")["tier"] == "cpu"
    assert suggest_hyperparameters(HW_FOR_TIER["cuda-80gb"], backend="cpu")["tier"] == "cpu"
    assert suggest_hyperparameters(HW_FOR_TIER["cpu"], backend="mlx")["tier"] == "cpu"  # mlx[cpu] on Linux
    assert suggest_hyperparameters(HW_FOR_TIER["apple-max"], backend="mps")["tier"] == "apple-max"


# -----------------------------------------------------------------------------
# Summary and `python -m backends`

def test_summary_apple_and_nvidia(capsys):
    hw = HardwareInfo(platform="darwin", machine="arm64", cpu_model="Apple M3 Max", cpu_cores=14,
                      cpu_physical_cores=14, vector_extensions=["neon", "bf16"], **apple("m3-max-30c", "json"))
    print_hardware_summary(hw)
    out = capsys.readouterr().out
    assert "Hardware: Apple M3 Max (Apple Silicon, M3 max)" in out
    assert "Memory: 36.0 GB unified" in out and "GPU cores: 30 (from system_profiler)" in out
    assert "Peak bf16: 19.5 TFLOP/s (estimate: 30 GPU cores x 0.65 TFLOPS/core (M3))" in out
    gpu = hardware.gpu_fields("NVIDIA H100 80GB HBM3", 79.2, "9.0", sm_count=132)
    print_hardware_summary(replace(hw, **gpu, gpu_cores=None))
    out = capsys.readouterr().out
    assert "GPU: 132 SMs, compute capability 9.0" in out
    assert "Peak bf16: 989.0 TFLOP/s (datasheet table: H100 SXM)" in out


def test_import_does_not_load_torch_or_mlx():
    # backends.mlx_cpu too: its OpenBLAS preload only works before mlx is loaded
    code = ("import sys, backends, backends.mlx_cpu; "
            "print(sorted(m for m in ('torch', 'mlx', 'mlx.core', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.skipif(not ON_PLAIN_CPU, reason="expects a Linux machine without a GPU")
def test_python_m_backends(tmp_path):
    r = run_module({"AUTORESEARCH_CACHE_DIR": str(tmp_path), "AUTORESEARCH_CPU_PEAK_FLOPS": "1.5e11"})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Hardware: ")
    assert "  Peak fp32: 150.0 GFLOP/s (env: AUTORESEARCH_CPU_PEAK_FLOPS)" in lines
    assert "Detected backend: cpu (training script: train.py)" in lines
    assert any(line.startswith("Evaluation profile: ") for line in lines)
    i = next(i for i, line in enumerate(lines) if line.startswith("Suggested config (tier cpu"))
    assert [line.split(":")[0].strip() for line in lines[i + 1:i + 4]] == ["Depth", "Device batch size",
                                                                           "Total batch size"]


def test_python_m_backends_forced_unavailable(tmp_path):
    r = run_module({"AUTORESEARCH_CACHE_DIR": str(tmp_path), "AUTORESEARCH_CPU_PEAK_FLOPS": "1e11",
                    "AUTORESEARCH_BACKEND": "mps" if sys.platform != "darwin" else "cuda"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: AUTORESEARCH_BACKEND=")
    assert "Detected backend" not in r.stdout


def test_python_m_backends_without_prepare(tmp_path):
    # A tree with backends/ but no prepare.py (or a broken one) still describes the hardware.
    shutil.copytree(ROOT / "backends", tmp_path / "backends", ignore=shutil.ignore_patterns("__pycache__"))
    r = run_module({"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache"), "AUTORESEARCH_CPU_PEAK_FLOPS": "1e11"},
                   cwd=tmp_path)
    assert r.returncode == 0 and "Evaluation profile: (prepare.py not available)" in r.stdout, r.stdout + r.stderr
    assert "max_seq_len 2048" in r.stdout
    (tmp_path / "prepare.py").write_text("raise RuntimeError('half-written')\n")
    r = run_module({"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache"), "AUTORESEARCH_CPU_PEAK_FLOPS": "1e11"},
                   cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "Evaluation profile: (prepare.py not available: RuntimeError: half-written)" in r.stdout


@pytest.mark.skipif(not ON_PLAIN_CPU, reason="expects a Linux machine without a GPU")
def test_python_m_backends_remeasure(tmp_path):
    if hardware.training_runs_elsewhere():
        pytest.skip(f"{hardware.training_runs_elsewhere()} running: the peak is not cached meanwhile")
    first = run_module({"AUTORESEARCH_CACHE_DIR": str(tmp_path)})
    assert first.returncode == 0 and "(just now, saved to " in first.stdout, first.stdout + first.stderr
    measured_at = (tmp_path / "hardware.json").read_text()
    assert "  CPU compute dtype: " in first.stdout  # the dtype the cpu tier's model would train in, and why
    again = run_module({"AUTORESEARCH_CACHE_DIR": str(tmp_path)}, args=["--remeasure"])
    assert again.returncode == 0 and "(just now, saved to " in again.stdout, again.stdout + again.stderr
    assert (tmp_path / "hardware.json").read_text() != measured_at
    # the spread of the rounds, for each dtype measured
    lines = again.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("  CPU peak fp32: "))
    assert re.fullmatch(r"    rounds: min [\d.]+ / median [\d.]+ / best [\d.]+ GFLOP/s over 5 rounds", lines[i + 1])
    assert any(line.startswith("  CPU peak bf16: ") for line in lines)
