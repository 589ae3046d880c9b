"""train.py and train_mlx.py: one model in two frameworks, one output contract, real end-to-end runs on tiny data."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from trainer_fixtures import (ROOT, TINY_SEQ_LEN, parse_summary, run_script, scrubbed_env,
                              tiny_dataset, tiny_scripts)  # noqa: F401  (tiny_dataset is a fixture)

STEP_RE = re.compile(r"step (\d{5}) \(([\d.]+)%\) \| loss: ([\d.]+) \| lrm: ([\d.]+) \| dt: (\d+)ms \| "
                     r"tok/sec: ([\d,]+) \| mfu: ([\d.]+)% \| epoch: (\d+) \| remaining: (\d+)s")
HARDWARE = Path(ROOT) / "tests" / "fixtures" / "hardware"
SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "backend", "chip"]

# ---------------------------------------------------------------------------
# Parity: the same weights give the same loss; the same groups follow float64 for three steps; the same init
# ---------------------------------------------------------------------------

def _models(seq_len=64, depth=3, dim=64, heads=2, vocab=300, pattern="SSSL"):
    import mlx.core as mx
    import torch
    import train
    import train_mlx
    from mlx.utils import tree_flatten, tree_map_with_path

    cfg = dict(sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=dim,
               window_pattern=pattern)
    torch.manual_seed(0)
    tm = train.GPT(train.GPTConfig(**cfg))
    tm.init_weights()
    with torch.no_grad():  # make every parameter non-trivial (zero-initialised projections hide bugs)
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mm = train_mlx.GPT(train_mlx.GPTConfig(**cfg))
    torch_params = dict(tm.named_parameters())
    mlx_names = [k for k, _ in tree_flatten(mm.parameters())]
    assert sorted(mlx_names) == sorted(torch_params), "parameter names must match between the frameworks"
    # copy along the model's own tree (tree_unflatten would turn the value_embeds dict {"1": ...} into a list)
    mm.update(tree_map_with_path(lambda k, _: mx.array(torch_params[k].detach().numpy()), mm.parameters()))
    return tm, mm


def test_same_weights_same_loss_torch_and_mlx():
    import mlx.core as mx
    import torch
    tm, mm = _models()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 300, size=(3, 64))
    y = rng.integers(0, 300, size=(3, 64))
    t_loss = tm(torch.from_numpy(x), torch.from_numpy(y), reduction="none").detach().numpy()
    m_loss = np.array(mm(mx.array(x), mx.array(y), reduction="none"))
    assert t_loss.shape == m_loss.shape == (3, 64)
    np.testing.assert_allclose(m_loss, t_loss, rtol=2e-5, atol=2e-5)
    assert tm.window_sizes == [32, 32, 64]   # the short windows (masked attention path) are exercised too


TRAINER_LRS = dict(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, weight_decay=0.2, scalar_lr=0.5)


def _group_spec(groups, name_of):
    """A param group as comparable values: its parameter names and every hyperparameter."""
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [name_of(p) for p in g["params"]]}
            for g in groups]


def test_the_torch_trainers_cpu_loss_is_the_loss_of_its_own_logits():
    """train.py's CPU loss (backends/loss_torch.py) against F.cross_entropy of the logits the same model returns
    (what the sealed evaluation scores): the same loss and the same gradient for every parameter."""
    import torch
    import torch.nn.functional as F
    tm, _ = _models()
    x, y = torch.from_numpy(np.random.default_rng(2).integers(0, 300, size=(2, 3, 64)))
    y[0, :5] = -1
    losses = []
    for loss_fn in (lambda: tm(x, y), lambda: F.cross_entropy(tm(x).flatten(0, 1), y.flatten(), ignore_index=-1)):
        loss = loss_fn()
        losses.append((loss.item(), torch.autograd.grad(loss, list(tm.parameters()))))
    (fused, grads), (plain, plain_grads) = losses
    assert abs(fused - plain) < 1e-6 * plain
    for (name, _), a, b in zip(tm.named_parameters(), grads, plain_grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-12, name


def test_trainers_follow_the_float64_reference_for_three_steps():
    """Both trainers' own parameter groups through three steps of their own schedules against float64 (the model in
    float64 torch, the optimizer in NumPy): the Adam betas, Muon's momentum and NorMuon's beta2 cancel out of a first
    step, so a wrong one shows only from the second."""
    import copy
    import mlx.core as mx
    import mlx.nn as nn
    import torch
    import train
    import train_mlx
    from mlx.utils import tree_flatten
    from muon_reference import ref_step
    tm, mm = _models()
    names = {id(p): n for n, p in tm.named_parameters()}
    t_opt, m_opt = tm.setup_optimizer(**TRAINER_LRS), mm.setup_optimizer(**TRAINER_LRS)
    ref_groups = _group_spec(t_opt.param_groups, lambda p: names[id(p)])
    assert ref_groups == _group_spec(m_opt.param_groups, str), "the trainers must build the same groups"
    ref_model = copy.deepcopy(tm).double()
    ref_params = {n: p.detach().double().numpy().copy() for n, p in tm.named_parameters()}
    start = dict(ref_params)
    states = {}
    rng = np.random.default_rng(1)
    loss_and_grad = nn.value_and_grad(mm, lambda m, a, b: m(a, b))
    for step, progress in enumerate((0.0, 0.55, 0.8)):  # the last two in the warmdown: lr falls step by step
        x, y = rng.integers(0, 300, size=(2, 2, 64))
        for module in (train, train_mlx):
            assert module.get_lr_multiplier(progress) == train.get_lr_multiplier(progress)
            assert module.get_muon_momentum(step) == train.get_muon_momentum(step)
        for groups in (t_opt.param_groups, m_opt.param_groups, ref_groups):  # what the training loops do
            for group in groups:
                group["lr"] = group["initial_lr"] * train.get_lr_multiplier(progress)
                if group["kind"] == "muon":
                    group["momentum"] = train.get_muon_momentum(step)
                    group["weight_decay"] = train.get_weight_decay(progress)
        tm(torch.from_numpy(x), torch.from_numpy(y)).backward()
        t_opt.step()
        tm.zero_grad(set_to_none=True)
        _, grads = loss_and_grad(mm, mx.array(x), mx.array(y))
        m_opt.update(mm, grads)
        mx.eval(mm.parameters())
        with torch.no_grad():
            for n, p in ref_model.named_parameters():
                p.copy_(torch.from_numpy(ref_params[n]))
        ref_model.zero_grad(set_to_none=True)
        ref_model(torch.from_numpy(x), torch.from_numpy(y)).backward()
        ref_step(ref_params, {n: p.grad.numpy() for n, p in ref_model.named_parameters()}, ref_groups, states)
    mlx_params = dict(tree_flatten(mm.parameters()))
    assert sorted(mlx_params) == sorted(ref_params)
    for name, want in ref_params.items():
        assert np.abs(want - start[name]).max() > 3e-3, name  # every parameter trained, by more than the tolerance
        for framework, got in (("torch", tm.get_parameter(name).detach().numpy()), ("mlx", np.array(mlx_params[name]))):
            # fp32 against float64: ~1e-7, except a few entries of the embeddings, whose Adam steps (lr ~2) divide a
            # near-zero gradient by its own root mean square, where fp32 rounding moves up to ~1e-2 (0.5% of one such step)
            err = np.abs(got - want)
            assert (err > 1e-5).mean() < 1e-2 and err.max() < 2e-2, (framework, name, err.max(), (err > 1e-5).mean())


def test_mlx_init_weights_match_the_torch_init_statistics():
    """MLX's init_weights draws every parameter from the torch init's distribution: the same constants, and the same
    mean, std and range for the normal and uniform ones."""
    import torch
    import train
    import train_mlx
    from mlx.utils import tree_flatten
    cfg = dict(sequence_len=64, vocab_size=4096, n_layer=2, n_head=2, n_kv_head=2, n_embd=256, window_pattern="SL")
    torch.manual_seed(0)
    tm = train.GPT(train.GPTConfig(**cfg))
    tm.init_weights()
    mm = train_mlx.GPT(train_mlx.GPTConfig(**cfg))
    mm.init_weights()
    mlx_params = {k: np.array(v) for k, v in tree_flatten(mm.parameters())}
    assert sorted(mlx_params) == sorted(n for n, _ in tm.named_parameters())
    for name, p in tm.named_parameters():
        t, m = p.detach().double().numpy(), mlx_params[name].astype(np.float64)
        assert m.shape == t.shape, name
        if t.std() == 0:  # zeros, ones, 0.1: exactly
            np.testing.assert_array_equal(m, t, err_msg=name)
            continue
        n = t.size
        assert abs(m.mean() - t.mean()) < 6 * t.std() / n**0.5, name
        assert m.std() == pytest.approx(t.std(), rel=6 / n**0.5), name
        # the shape of the distribution: a uniform's max is sqrt(3) std, a normal's ~4-5 std at these sizes
        assert np.abs(m).max() / m.std() == pytest.approx(np.abs(t).max() / t.std(), rel=0.15), name


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_a_parameter_outside_the_optimizer_groups_is_an_error(framework):
    """The agent adds a parameter outside the transformer blocks and forgets its optimizer group: setup_optimizer
    names it instead of training without it."""
    import mlx.core as mx
    import torch
    tm, mm = _models()
    if framework == "torch":
        tm.out_gain = torch.nn.Parameter(torch.ones(tm.config.n_embd))
        model = tm
    else:
        mm.out_gain = mx.ones((mm.config.n_embd,))
        model = mm
    with pytest.raises(AssertionError, match=r"parameters in no optimizer group would never train: out_gain$"):
        model.setup_optimizer()


def test_flex_attention_matches_sdpa_windows():
    """The CUDA attention path (FlexAttention, here in eager mode on the CPU) equals SDPA with an explicit mask."""
    import torch
    import train
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 64, 2, 32) for _ in range(3))
    for window in (16, 32, 64):
        np.testing.assert_allclose(train.flex_attention_fn(q, k, v, window).numpy(),
                                   train.sdpa_attention(q, k, v, window).numpy(), atol=1e-5)
    # and the window really limits attention: a change 20 tokens back is invisible with window 16
    k2 = k.clone()
    k2[:, 10] += 5.0
    a, b = train.sdpa_attention(q, k, v, 16), train.sdpa_attention(q, k2, v, 16)
    assert torch.equal(a[:, 27:], b[:, 27:]) and not torch.equal(a[:, 10:27], b[:, 10:27])

def test_mlx_trainer_preloads_openblas_before_mlx(tmp_path):
    """A preload after mlx is loaded would change nothing: MLX's BLAS calls are already bound to its bundled BLAS."""
    import ctypes.util
    import subprocess
    import sys
    code = ("import sys, backends.mlx_cpu as m\n"
            "preload = m.preload_openblas\n"
            "def spy():\n"
            "    print('preload with mlx loaded:', 'mlx.core' in sys.modules)\n"
            "    return preload()\n"
            "m.preload_openblas = spy\n"
            "import train_mlx\n"
            "print('OPENBLAS:', train_mlx.OPENBLAS)\n")
    libm = ctypes.util.find_library("m")  # stands in for an OpenBLAS the user points at
    env = scrubbed_env(AUTORESEARCH_OPENBLAS=libm, AUTORESEARCH_CACHE_DIR=tmp_path, AUTORESEARCH_PROFILE="cpu",
                       AUTORESEARCH_CPU_PEAK_FLOPS="1e11")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["preload with mlx loaded: False", f"OPENBLAS: {libm}"]

# ---------------------------------------------------------------------------
# End to end on tiny data, both trainers
# ---------------------------------------------------------------------------

def uniform_bpb(env):
    """The val_bpb of a model with uniform logits on the same evaluation set: log2(V) x tokens / bytes."""
    import subprocess
    import sys
    code = ("import prepare, math; t = prepare.Tokenizer.from_directory(); r = prepare.eval_rows(t, prepare.MAX_SEQ_LEN);"
            "b = prepare.get_token_bytes(t)[r[:, 1:]]; print(math.log2(t.get_vocab_size()) * (b > 0).sum() / b.sum())")
    out = subprocess.run([sys.executable, "-c", code], env=scrubbed_env(**env), cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


E2E_BUDGET = 5  # seconds: every step counts on a CPU (no warm-up steps for free), and a loaded 2-core box is slow


def check_run(r, backend, env):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    steps = [STEP_RE.search(seg) for seg in out.split("\r") if seg.startswith("step ")]
    assert steps and all(steps), "every progress segment must match the contract"
    summary = parse_summary(out)
    assert list(summary) == SUMMARY_KEYS
    for line in out.rsplit("\n---\n", 1)[1].splitlines():
        assert line.index(line.split()[1]) == 18, f"value must start at column 18: {line!r}"
    val = float(summary["val_bpb"])
    assert math.isfinite(val) and val < 0.8 * uniform_bpb(env)
    assert summary["backend"] == backend
    assert int(summary["num_steps"]) >= 2 and float(summary["training_seconds"]) >= E2E_BUDGET
    assert f"Backend: {backend} (" in out and "Profile: cpu" in out and "Dataset: tiny" in out
    return summary


def test_torch_trainer_end_to_end(tiny_dataset, tmp_path):
    tiny_scripts(tmp_path)
    r = run_script(tmp_path / "train.py", tiny_dataset, budget=E2E_BUDGET, AUTORESEARCH_BACKEND="cpu")
    check_run(r, "cpu", tiny_dataset)


@pytest.mark.parametrize("accum", [1, 2])
def test_mlx_trainer_end_to_end(tiny_dataset, tmp_path, accum):
    tiny_scripts(tmp_path, TOTAL_BATCH_SIZE=accum * 8 * TINY_SEQ_LEN)
    r = run_script(tmp_path / "train_mlx.py", tiny_dataset, budget=E2E_BUDGET)
    check_run(r, "mlx", tiny_dataset)
    assert f"Gradient accumulation steps: {accum}" in r.stdout


def test_dispatcher_runs_mlx_with_the_same_contract(tiny_dataset, tmp_path):
    tiny_scripts(tmp_path)
    r = run_script(tmp_path / "train.py", tiny_dataset, budget=E2E_BUDGET, AUTORESEARCH_BACKEND="mlx")
    check_run(r, "mlx", tiny_dataset)


def test_unavailable_backend_is_one_line(tiny_dataset, tmp_path):
    tiny_scripts(tmp_path)
    r = run_script(tmp_path / "train.py", tiny_dataset, AUTORESEARCH_BACKEND="mps")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and r.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("script", ["train.py", "train_mlx.py"])
def test_fast_fail_on_nan(tiny_dataset, tmp_path, script):
    tiny_scripts(tmp_path, UNEMBEDDING_LR='float("nan")', EMBEDDING_LR='float("nan")')
    r = run_script(tmp_path / script, tiny_dataset, AUTORESEARCH_BACKEND="cpu")
    assert r.returncode != 0
    assert "FAIL" in r.stdout.splitlines() and "---" not in r.stdout.splitlines()


@pytest.mark.parametrize("script", ["train.py", "train_mlx.py"])
def test_missing_data_and_tokenizer_is_one_line(tmp_path, script):
    tiny_scripts(tmp_path)
    env = dict(AUTORESEARCH_CACHE_DIR=str(tmp_path / "empty"), AUTORESEARCH_PROFILE="cpu",
               AUTORESEARCH_CPU_PEAK_FLOPS="1e11")
    r = run_script(tmp_path / script, env, AUTORESEARCH_BACKEND="cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "no tokenizer" in r.stderr and "uv run prepare.py" in r.stderr


@pytest.mark.parametrize("script, machine, backend, uncounted", [("train.py", "nvidia-smi-h100.csv", "cpu", 0),
                                                                 ("train_mlx.py", "m1", None, 1)])
def test_a_cpu_run_on_a_gpu_machine_uses_the_cpu_profile_and_peak(tiny_dataset, tmp_path, script, machine, backend,
                                                                  uncounted):
    """AUTORESEARCH_BACKEND=cpu on an H100 machine, MLX on a CPU with a Mac's chip name: the run evaluates with the
    cpu profile even though the first prepare recorded the GPU's, MFU divides by the CPU's peak (1e11 here), and the
    steady-state MFU counts exactly the steps that were timed."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_dataset["AUTORESEARCH_CACHE_DIR"], cache)
    profile = "gpu" if machine.startswith("nvidia") else "apple"
    (cache / "profile.json").write_text(json.dumps({"profile": profile, "max_seq_len": 2048, "eval_tokens": 5242880}))
    env = {k: v for k, v in tiny_dataset.items() if k != "AUTORESEARCH_PROFILE"}
    env.update(AUTORESEARCH_CACHE_DIR=str(cache), AUTORESEARCH_SIMULATE_HARDWARE=str(HARDWARE / machine))
    if backend:
        env["AUTORESEARCH_BACKEND"] = backend
    tiny_scripts(tmp_path)
    r = run_script(tmp_path / script, env, budget=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Profile: cpu (max_seq_len=64" in r.stdout
    assert "| peak 0.10 TFLOPS for MFU (env: AUTORESEARCH_CPU_PEAK_FLOPS)" in r.stdout
    assert f"Total batch size: {8 * TINY_SEQ_LEN:,} tokens (8 x {TINY_SEQ_LEN} per micro-batch)" in r.stdout
    if script == "train.py":  # the CPU dtype is measured at this model's width (or there is no bf16 hardware)
        assert re.search(r"\nCPU compute dtype: (float32|bfloat16) \((measured: |no amx_bf16)", r.stdout)
    flops_per_token = float(re.search(r"Estimated FLOPs per token: (\S+)", r.stdout).group(1))
    dts = [int(m.group(5)) / 1000 for m in map(STEP_RE.search, r.stdout.split("\r")) if m]
    summary = parse_summary(r.stdout)
    assert int(summary["num_steps"]) == len(dts)
    chip = re.search(r"\nChip: (.*?) \| peak", r.stdout).group(1)  # the CPU that trained, not the machine's GPU
    assert chip == summary["chip"] and not any(gpu in chip for gpu in ("H100", "Apple", "NVIDIA"))
    timed = dts[uncounted:]  # on a CPU every step is timed but MLX's step 0 (mx.compile)
    want = 100 * flops_per_token * 8 * TINY_SEQ_LEN * len(timed) / sum(timed) / 1e11
    # one step more than was timed would be 1 / len(timed) (a few %) too high; dt is printed to the millisecond
    assert float(summary["mfu_percent"]) == pytest.approx(want, rel=0.25 / len(timed))


@pytest.mark.parametrize("script,uncounted", [("train.py", 0), ("train_mlx.py", 1)])
def test_cpu_budget_counts_every_step_but_the_compile(tiny_dataset, tmp_path, script, uncounted):  # noqa: F811
    """On a CPU nothing is compiled, so no step is left out of the budget (upstream's 11 warm-up steps cost ~17 s of a
    5-minute CPU run); MLX leaves out only step 0, where mx.compile builds the step. A 1 ms budget stops after the
    first counted step, and training_seconds is the sum of the counted steps' dt."""
    tiny_scripts(tmp_path)
    r = run_script(tmp_path / script, tiny_dataset, budget=0.001, AUTORESEARCH_BACKEND="cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = parse_summary(r.stdout)
    assert int(summary["num_steps"]) == uncounted + 1
    dts = [int(m.group(5)) for m in map(STEP_RE.search, r.stdout.split("\r")) if m]
    assert len(dts) == uncounted + 1
    assert abs(float(summary["training_seconds"]) - sum(dts[uncounted:]) / 1000) <= 0.05 + 0.001 * len(dts)
