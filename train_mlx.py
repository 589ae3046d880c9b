"""
Autoresearch pretraining script for MLX: Metal on Apple Silicon, CPU on Linux. Single device, single file.
The agent edits this file (train.py is the PyTorch twin, same model and output). prepare.py and backends/ are fixed.

Usage:
    uv run train.py                                  # on Apple Silicon this runs train_mlx.py
    AUTORESEARCH_BACKEND=mlx uv run train.py         # force MLX anywhere it is installed
    uv run train_mlx.py
"""

import time

t_start = time.time()  # total_seconds counts from here: imports, compile and evaluation are all overhead

import gc
import math
import os
import sys
from dataclasses import asdict, dataclass
from functools import partial

from backends.mlx_cpu import blas_name, preload_openblas, softcap_cross_entropy

OPENBLAS = preload_openblas()  # before mlx loads: its matmuls then run on MKL or OpenBLAS, not the bundled BLAS

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from backends import get_hardware_info, get_peak_flops, get_peak_memory_mb, suggest_hyperparameters
from backends.muon_mlx import MuonAdamW
from prepare import (MAX_SEQ_LEN, RUN_DIR, TIME_BUDGET, Tokenizer, describe_setup, evaluate_bpb, export_model,
                     make_dataloader, print_summary)

ON_METAL = mx.metal.is_available()
COMPUTE_DTYPE = mx.bfloat16 if ON_METAL else mx.float32  # bf16 on the GPU; CPUs without AVX-512 crawl in bf16
RMS_EPS = float(mx.finfo(mx.float32).eps)                # matches torch's F.rms_norm default

# ---------------------------------------------------------------------------
# GPT model (the same model as train.py; parameter names match too)
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


def norm(x):
    return mx.fast.rms_norm(x, None, RMS_EPS)


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def rope(x):
    # Upstream rotates the two halves by -theta (y1 = x1 cos + x2 sin): MLX's non-traditional rope with negated positions
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=10000, scale=-1.0, offset=0)


_masks = {}


def attention_mask(T, window):
    """'causal' when the window covers the sequence; else a boolean sliding-window mask (True = attend)."""
    if window >= T - 1:
        return "causal"
    if (T, window) not in _masks:
        i = mx.arange(T)
        _masks[(T, window)] = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window)
    return _masks[(T, window)]


class Linear(nn.Module):
    """A bias-free linear layer that computes in the input's dtype (manual autocast: fp32 master weights)."""

    def __init__(self, in_dims, out_dims):
        super().__init__()
        self.weight = mx.zeros((out_dims, in_dims))

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate_channels = 32
        if has_ve(layer_idx, config.n_layer):
            self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head)

    def __call__(self, x, ve, window):
        B, T, C = x.shape
        heads = lambda t, h: t.reshape(B, T, h, self.head_dim).transpose(0, 2, 1, 3)  # -> (B, H, T, D)
        q = heads(self.c_q(x), self.n_head)
        k = heads(self.c_k(x), self.n_kv_head)
        v = heads(self.c_v(x), self.n_kv_head)
        if ve is not None:  # value residual: mix in the value embedding with an input-dependent gate per head
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, H)
            v = v + gate.transpose(0, 2, 1)[..., None] * heads(ve, self.n_kv_head)
        q, k = norm(rope(q)), norm(rope(k))
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=attention_mask(T, window))
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def __call__(self, x):
        return self.c_proj(mx.square(nn.relu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def __call__(self, x, ve, window):
        x = x + self.attn(norm(x), ve, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = {"wte": nn.Embedding(config.vocab_size, config.n_embd),
                            "h": [Block(config, i) for i in range(config.n_layer)]}
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        self.resid_lambdas = mx.ones((config.n_layer,))
        self.x0_lambdas = mx.zeros((config.n_layer,))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = {str(i): nn.Embedding(config.vocab_size, kv_dim)
                             for i in range(config.n_layer) if has_ve(i, config.n_layer)}

    def window_sizes(self):
        pattern = self.config.window_pattern.upper()
        assert pattern and all(c in "SL" for c in pattern), f"WINDOW_PATTERN must use only S and L, got {pattern!r}"
        long_window, short_window = self.config.sequence_len, self.config.sequence_len // 2
        sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(self.config.n_layer)]
        sizes[-1] = long_window  # the last layer always sees the full context
        return sizes

    def init_weights(self):
        c = self.config
        s = 3**0.5 * c.n_embd**-0.5  # uniform bound with the std of a 1/sqrt(d) normal
        uniform = lambda shape: mx.random.uniform(-s, s, shape)
        self.transformer["wte"].weight = mx.random.normal(self.transformer["wte"].weight.shape)
        self.lm_head.weight = mx.random.normal(self.lm_head.weight.shape) * 0.001
        for block in self.transformer["h"]:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                lin.weight = uniform(lin.weight.shape)
            block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
            if "ve_gate" in block.attn:
                block.attn.ve_gate.weight = mx.zeros_like(block.attn.ve_gate.weight)
        self.resid_lambdas = mx.ones((c.n_layer,))
        self.x0_lambdas = mx.full((c.n_layer,), 0.1)
        for ve in self.value_embeds.values():
            ve.weight = uniform(ve.weight.shape)

    def estimate_flops(self):
        """Training FLOPs per token: 6 x (matmul params) + attention over each layer's window."""
        counts = self.num_scaling_params()
        h, q, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = sum(12 * h * q * min(w, t) for w in self.window_sizes())
        return 6 * (counts["lm_head"] + counts["transformer_matrices"]) + attn_flops

    def num_scaling_params(self):
        size = lambda tree: sum(p.size for _, p in tree_flatten(tree))
        counts = dict(wte=size(self.transformer["wte"].parameters()), value_embeds=size(self.value_embeds),
                      lm_head=size(self.lm_head.parameters()),
                      transformer_matrices=size([b.parameters() for b in self.transformer["h"]]),
                      scalars=self.resid_lambdas.size + self.x0_lambdas.size)
        counts["total"] = sum(counts.values())
        return counts

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        adam_betas=(0.8, 0.95), scalar_lr=0.5):
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at d=768
        paths = [path for path, _ in tree_flatten(self.trainable_parameters())]
        shapes = dict(tree_flatten(tree_map(lambda p: tuple(p.shape), self.trainable_parameters()),
                                   is_leaf=lambda x: isinstance(x, tuple)))
        matrix_paths = [p for p in paths if p.startswith("transformer.h.")]
        param_groups = [
            dict(kind="adamw", params=["lm_head.weight"], lr=unembedding_lr * dmodel_lr_scale, betas=adam_betas,
                 eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=["transformer.wte.weight"], lr=embedding_lr * dmodel_lr_scale,
                 betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=[p for p in paths if p.startswith("value_embeds.")],
                 lr=embedding_lr * dmodel_lr_scale, betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=["resid_lambdas"], lr=scalar_lr * 0.01, betas=adam_betas, eps=1e-10,
                 weight_decay=0.0),
            dict(kind="adamw", params=["x0_lambdas"], lr=scalar_lr, betas=(0.96, 0.95), eps=1e-10,
                 weight_decay=0.0),
        ]
        for shape in sorted({shapes[p] for p in matrix_paths}):
            param_groups.append(dict(kind="muon", params=[p for p in matrix_paths if shapes[p] == shape],
                                     lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        # every parameter in exactly one group (upstream's check): one left out would silently never train
        grouped = {path for group in param_groups for path in group["params"]}
        missing = [path for path in paths if path not in grouped]
        assert not missing, f"parameters in no optimizer group would never train: {', '.join(missing)}"
        optimizer = MuonAdamW([g for g in param_groups if g["params"]], self)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def __call__(self, idx, targets=None, reduction="mean"):
        x = norm(self.transformer["wte"](idx).astype(COMPUTE_DTYPE))
        x0 = x
        for i, (block, window) in enumerate(zip(self.transformer["h"], self.window_sizes())):
            x = (self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0).astype(COMPUTE_DTYPE)
            ve = self.value_embeds[str(i)](idx).astype(COMPUTE_DTYPE) if str(i) in self.value_embeds else None
            x = block(x, ve, window)
        x = norm(x)
        softcap = 15
        if targets is None:
            logits = self.lm_head(x).astype(mx.float32)
            return softcap * mx.tanh(logits / softcap)
        # the same maths in cache-sized chunks over the CPU cores (backends/mlx_cpu.py); on Metal the plain lines
        return softcap_cross_entropy(x, self.lm_head.weight, targets, softcap, reduction)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

_hw = get_hardware_info()
_hp = suggest_hyperparameters(_hw, MAX_SEQ_LEN, backend="mlx")  # depth and batch sized for this machine

# Model architecture
ASPECT_RATIO = 64       # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 128          # target head dimension for attention
WINDOW_PATTERN = "L" if _hp["tier"] == "cpu" else "SSSL"  # L=full, S=half context (CPU: benchmarks/cpu_sweep.md)

# Optimization
TOTAL_BATCH_SIZE = _hp["total_batch_size"]  # tokens per optimizer step
EMBEDDING_LR = 0.6      # learning rate for token embeddings (Adam)
UNEMBEDDING_LR = 0.004  # learning rate for lm_head (Adam)
MATRIX_LR = 0.04        # learning rate for matrix parameters (Muon)
SCALAR_LR = 0.5         # learning rate for per-layer scalars (Adam)
WEIGHT_DECAY = 0.2      # cautious weight decay for Muon
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0      # fraction of time budget for LR warmup
WARMDOWN_RATIO = 0.5    # fraction of time budget for LR warmdown
FINAL_LR_FRAC = 0.0     # final LR as fraction of initial

# Model size and memory
DEPTH = _hp["depth"]                          # number of transformer layers
DEVICE_BATCH_SIZE = _hp["device_batch_size"]  # rows per forward/backward (reduce if out of memory)

# ---------------------------------------------------------------------------
# Setup: tokenizer, model, optimizer, dataloader, compiled steps
# ---------------------------------------------------------------------------

def build_model_config(depth, vocab_size):
    base_dim = depth * ASPECT_RATIO
    model_dim = ((base_dim + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    num_heads = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=WINDOW_PATTERN)


def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown * 1.0 + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def loss_fn(model, x, y):
    return model(x, y)


if __name__ == "__main__":
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    mx.random.seed(seed)
    # MLX on a CPU (Linux, or a Mac without Metal) is measured against the CPU's own fp32 peak
    peak_flops, peak_source = get_peak_flops(_hw, "mlx" if ON_METAL else "cpu", with_source=True)
    peak_flops = peak_flops or 0.0
    device = "Metal GPU" if ON_METAL else "CPU"
    blas = ("" if ON_METAL else
            f", BLAS: {blas_name(OPENBLAS)} {OPENBLAS}" if OPENBLAS else
            ", BLAS: bundled reference BLAS (slow: uv sync installs MKL on x86_64; else sudo apt install "
            "libopenblas0-pthread)")

    print(f"Backend: mlx (MLX {mx.__version__}, {device}, {'bf16' if COMPUTE_DTYPE == mx.bfloat16 else 'fp32'}, "
          f"mx.compile{blas})")
    chip = _hw.chip_name if ON_METAL else (_hw.cpu_model or _hw.chip_name)  # the chip that trains
    print(f"Chip: {chip} | peak {peak_flops / 1e12:.2f} TFLOPS for MFU ({peak_source})")
    print(describe_setup())

    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")

    config = build_model_config(DEPTH, vocab_size)
    print(f"Model config: {asdict(config)}")
    model = GPT(config)
    model.init_weights()
    mx.eval(model.parameters())

    param_counts = model.num_scaling_params()
    print("Parameter counts:")
    for key, value in param_counts.items():
        print(f"  {key:24s}: {value:,}")
    num_params = param_counts["total"]
    num_flops_per_token = model.estimate_flops()
    print(f"Estimated FLOPs per token: {num_flops_per_token:e}")

    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0, (
        f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN ({tokens_per_fwdbwd})")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd

    optimizer = model.setup_optimizer(unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, scalar_lr=SCALAR_LR,
                                      adam_betas=ADAM_BETAS, matrix_lr=MATRIX_LR, weight_decay=WEIGHT_DECAY)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(x, y):
        """One micro-batch that is a whole step: gradients and the optimizer update in one graph."""
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    @partial(mx.compile, inputs=model.state, outputs=model.state)  # value_and_grad swaps the params in and out
    def grad_step(x, y):
        return loss_and_grad(model, x, y)

    @partial(mx.compile, inputs=state, outputs=state)
    def apply_grads(grads):
        optimizer.update(model, grads)
        return grads

    # Steps left out of the time budget: mx.compile traces and compiles in the first call (fixed shapes), so step 0
    warmup_steps = 1
    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device="mlx")
    x, y, epoch = next(train_loader)  # prefetch the first batch

    print(f"Time budget: {TIME_BUDGET}s")
    print(f"Total batch size: {TOTAL_BATCH_SIZE:,} tokens ({DEVICE_BATCH_SIZE} x {MAX_SEQ_LEN} per micro-batch)")
    print(f"Gradient accumulation steps: {grad_accum_steps}")

# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------

    t_start_training = time.time()
    smooth_train_loss = 0
    total_training_time = 0
    step = 0

    while True:
        t0 = time.time()

        # Progress and schedules (read by the compiled step through optimizer.state)
        progress = min(total_training_time / TIME_BUDGET, 1.0)
        lrm = get_lr_multiplier(progress)
        muon_momentum = get_muon_momentum(step)
        muon_weight_decay = get_weight_decay(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay
        optimizer.sync_hyperparameters()

        if grad_accum_steps == 1:
            train_loss = train_step(x, y)
            mx.eval(train_loss, state)
            x, y, epoch = next(train_loader)
        else:
            accum, train_loss = None, None
            for micro_step in range(grad_accum_steps):
                loss, grads = grad_step(x, y)
                grads = tree_map(lambda g: g / grad_accum_steps, grads)
                accum = grads if accum is None else tree_map(mx.add, accum, grads)
                train_loss = loss
                mx.eval(accum, train_loss)  # evaluate every micro-step: memory does not grow with accumulation
                x, y, epoch = next(train_loader)
            apply_grads(accum)
            mx.eval(state)
            del accum

        train_loss_f = train_loss.item()

        # Fast fail: abort if the loss is exploding or not a number
        if not math.isfinite(train_loss_f) or train_loss_f > 100:
            print()
            print("FAIL")
            sys.exit(1)

        t1 = time.time()
        dt = t1 - t0

        if step >= warmup_steps:
            total_training_time += dt

        # Logging
        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta**(step + 1))
        pct_done = 100 * progress
        tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
        mfu = 100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops if peak_flops else 0.0
        remaining = max(0, TIME_BUDGET - total_training_time)

        print(f"\rstep {step:05d} ({pct_done:.1f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | "
              f"dt: {dt*1000:.0f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.1f}% | epoch: {epoch} | "
              f"remaining: {remaining:.0f}s    ", end="", flush=True)

        # GC management (Python's GC causes ~500ms stalls)
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()

        step += 1

        # Time's up, but only stop after the warm-up steps (which do not count)
        if step >= warmup_steps and total_training_time >= TIME_BUDGET:
            break

    print()  # newline after the \r training log

    total_tokens = step * TOTAL_BATCH_SIZE

# ---------------------------------------------------------------------------
# Final evaluation and summary
# ---------------------------------------------------------------------------

    if RUN_DIR:  # the agent loop scores the exported model in a separate process (prepare.py --evaluate)
        print("Training complete. Exporting...", flush=True)
        export_model(model, tokenizer, DEVICE_BATCH_SIZE)
        val_bpb = None
    else:
        print("Training complete. Evaluating...", flush=True)
        val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)

    t_end = time.time()
    # the steps from warmup_steps on were timed
    steady_state_mfu = (100 * num_flops_per_token * TOTAL_BATCH_SIZE * (step - warmup_steps) / total_training_time / peak_flops
                        if total_training_time > 0 and peak_flops else 0.0)
    peak_vram_mb = get_peak_memory_mb("mlx")

    print_summary(val_bpb=val_bpb, training_seconds=total_training_time, total_seconds=t_end - t_start,
                  peak_vram_mb=peak_vram_mb, mfu_percent=steady_state_mfu, total_tokens_M=total_tokens / 1e6,
                  num_steps=step, num_params_M=num_params / 1e6, depth=DEPTH, backend="mlx", chip=chip)
