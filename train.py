"""
Autoresearch pretraining script: PyTorch on CUDA, Apple MPS or CPU. Single device, single file.
The agent edits this file (train_mlx.py is the MLX twin). prepare.py and backends/ are fixed.

Usage:
    uv run train.py                               # backend from the hardware (MLX runs train_mlx.py)
    AUTORESEARCH_BACKEND=cpu uv run train.py      # force one: auto | mlx | mps | cuda | cpu
"""

import time

t_start = time.time()  # total_seconds counts from here: imports, compile and evaluation are all overhead

import gc
import math
import os
import sys
from dataclasses import asdict, dataclass

from backends import BackendUnavailable, detect_backend

# ---------------------------------------------------------------------------
# Backend dispatch: MLX has its own script with the same output and exit code
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    try:
        BACKEND = detect_backend()
    except BackendUnavailable as e:
        sys.exit(f"error: {e}")
    if BACKEND == "mlx":
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_mlx.py")
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, script, *sys.argv[1:]])
else:
    BACKEND = os.environ.get("AUTORESEARCH_TRAIN_BACKEND", "cpu")  # imported by tests: build models on the CPU

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
if BACKEND != "cuda":
    # Triton only serves CUDA kernels. Elsewhere autograd still imports it (via torch._dynamo, ~1.5 s) and it prints
    # spurious nanobind "leaked" reports at exit, so keep it out.
    sys.modules.setdefault("triton", None)

import torch
import torch.nn as nn
import torch.nn.functional as F

from backends import get_hardware_info, get_peak_flops, get_peak_memory_mb, suggest_hyperparameters, sync_device
from backends.hardware import choose_cpu_dtype
from backends.loss_torch import softcap_cross_entropy
from backends.muon_torch import MuonAdamW
from prepare import (MAX_SEQ_LEN, RUN_DIR, TIME_BUDGET, Tokenizer, describe_setup, evaluate_bpb, export_model,
                     make_dataloader, print_summary)

# ---------------------------------------------------------------------------
# GPT model
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
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)

# Attention kernels. q, k, v are (B, T, H, D); a token attends to itself and the `window` tokens before it.
# CUDA: FlexAttention (sliding windows skip whole blocks); MPS and CPU: SDPA with an explicit window mask.
_masks = {}


def window_mask(T, window, device):
    key = ("sdpa", T, window, str(device))
    if key not in _masks:
        i = torch.arange(T, device=device)
        _masks[key] = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window)
    return _masks[key]


def sdpa_attention(q, k, v, window):
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if k.size(1) != q.size(1):  # grouped-query attention
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    T = q.size(2)
    if window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, window, q.device))
    return y.transpose(1, 2)


def flex_block_mask(T, window, device):
    """Built outside the compiled model (setup precomputes them): creating one while tracing would break the graph."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = ("flex", T, window, str(device))
    if key not in _masks:
        def sliding_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
        _masks[key] = create_block_mask(sliding_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    return _masks[key]


def flex_attention_fn(q, k, v, window):
    from torch.nn.attention.flex_attention import flex_attention
    y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                       block_mask=flex_block_mask(q.size(1), window, q.device), enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


attention = sdpa_attention  # setup switches to flex_attention_fn on CUDA


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_ve(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: mix in the value embedding with an input-dependent gate per head
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        y = attention(q, k, v, window)
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, low_precision_embeddings=False):
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform bound with the std of a 1/sqrt(d) normal
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                torch.nn.init.uniform_(lin.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, self.config.n_embd // self.config.n_head,
                                                      device=self.cos.device)
        self.cos, self.sin = cos, sin
        if low_precision_embeddings:  # CUDA: bf16 embedding tables halve their memory traffic
            self.transformer.wte.to(dtype=torch.bfloat16)
            for ve in self.value_embeds.values():
                ve.to(dtype=torch.bfloat16)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000, device=None):
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def _compute_window_sizes(self, config):
        pattern = config.window_pattern.upper()
        assert pattern and all(c in "SL" for c in pattern), f"WINDOW_PATTERN must use only S and L, got {pattern!r}"
        long_window, short_window = config.sequence_len, config.sequence_len // 2
        sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
        sizes[-1] = long_window  # the last layer always sees the full context
        return sizes

    def estimate_flops(self):
        """Training FLOPs per token: 6 x (matmul params) + attention over each layer's window."""
        nparams = sum(p.numel() for p in self.parameters())
        ve_numel = sum(ve.weight.numel() for ve in self.value_embeds.values())
        exclude = self.transformer.wte.weight.numel() + ve_numel + self.resid_lambdas.numel() + self.x0_lambdas.numel()
        h, q, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = sum(12 * h * q * min(w, t) for w in self.window_sizes)
        return 6 * (nparams - exclude) + attn_flops

    def num_scaling_params(self):
        wte = sum(p.numel() for p in self.transformer.wte.parameters())
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = sum(p.numel() for p in self.lm_head.parameters())
        transformer_matrices = sum(p.numel() for p in self.transformer.h.parameters())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        total = wte + value_embeds + lm_head + transformer_matrices + scalars
        return dict(wte=wte, value_embeds=value_embeds, lm_head=lm_head,
                    transformer_matrices=transformer_matrices, scalars=scalars, total=total)

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        adam_betas=(0.8, 0.95), scalar_lr=0.5):
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at d=768
        matrix_params = list(self.transformer.h.parameters())
        param_groups = [
            dict(kind="adamw", params=list(self.lm_head.parameters()), lr=unembedding_lr * dmodel_lr_scale,
                 betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=list(self.transformer.wte.parameters()), lr=embedding_lr * dmodel_lr_scale,
                 betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=list(self.value_embeds.parameters()), lr=embedding_lr * dmodel_lr_scale,
                 betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=[self.resid_lambdas], lr=scalar_lr * 0.01, betas=adam_betas, eps=1e-10,
                 weight_decay=0.0),
            dict(kind="adamw", params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), eps=1e-10,
                 weight_decay=0.0),
        ]
        for shape in sorted({p.shape for p in matrix_params}):
            group_params = [p for p in matrix_params if p.shape == shape]
            param_groups.append(dict(kind="muon", params=group_params, lr=matrix_lr, momentum=0.95, ns_steps=5,
                                     beta2=0.95, weight_decay=weight_decay))
        # every parameter in exactly one group (upstream's check): one left out would silently never train
        grouped = {id(p) for group in param_groups for p in group["params"]}
        missing = [name for name, p in self.named_parameters() if id(p) not in grouped]
        assert not missing, f"parameters in no optimizer group would never train: {', '.join(missing)}"
        optimizer = MuonAdamW([g for g in param_groups if g["params"]])
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.size()
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i])
        x = norm(x)
        softcap = 15
        if targets is not None and x.device.type == "cpu":  # the same maths in cache-sized chunks (backends/loss_torch.py)
            return softcap_cross_entropy(x, self.lm_head.weight, targets, softcap, reduction)
        logits = self.lm_head(x).float()
        logits = softcap * torch.tanh(logits / softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction).view(targets.shape if reduction == "none" else ())

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

_hw = get_hardware_info()
_hp = suggest_hyperparameters(_hw, MAX_SEQ_LEN, backend=BACKEND)  # depth and batch sized for this machine

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
# Setup: device, tokenizer, model, optimizer, dataloader
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


if __name__ == "__main__":
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    torch.manual_seed(seed)
    device = torch.device(BACKEND)
    if BACKEND == "cuda":
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")
        compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        attention = flex_attention_fn
        device_name = torch.cuda.get_device_name()
    elif BACKEND == "cpu":  # bf16 only where it measured clearly faster at this model's width (cached); often ~100x slower
        dtype_name, dtype_note = choose_cpu_dtype(build_model_config(DEPTH, 0).n_embd, DEVICE_BATCH_SIZE * MAX_SEQ_LEN)
        compute_dtype = getattr(torch, dtype_name)
        device_name = f"{torch.get_num_threads()} threads"
    else:
        compute_dtype = torch.float32  # MPS: fp32 avoids dtype pitfalls
        device_name = _hw.chip_name
    autocast_ctx = torch.amp.autocast(device_type=BACKEND, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    peak_flops, peak_source = get_peak_flops(_hw, BACKEND, "bf16" if compute_dtype == torch.bfloat16 else "fp32",
                                             with_source=True)  # the CPU's own peak when the CPU trains
    peak_flops = peak_flops or 0.0
    use_compile = BACKEND == "cuda"  # CPU: compile time is not won back within 5 minutes; MPS: unsupported
    # Steps left out of the time budget: upstream's 11 absorb torch.compile. Nothing compiles elsewhere: all count.
    warmup_steps = 11 if use_compile else 0

    print(f"Backend: {BACKEND} (PyTorch {torch.__version__}, {device_name}, "
          f"{str(compute_dtype).removeprefix('torch.')}{', torch.compile' if use_compile else ''})")
    if BACKEND == "cpu":
        print(f"CPU compute dtype: {str(compute_dtype).removeprefix('torch.')} ({dtype_note})")
    chip = (_hw.cpu_model or _hw.chip_name) if BACKEND == "cpu" else _hw.chip_name  # the chip that trains
    print(f"Chip: {chip} | peak {peak_flops / 1e12:.2f} TFLOPS for MFU ({peak_source})")
    print(describe_setup())

    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")

    config = build_model_config(DEPTH, vocab_size)
    print(f"Model config: {asdict(config)}")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(low_precision_embeddings=BACKEND == "cuda")

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
    if use_compile:
        if attention is flex_attention_fn:
            for window in set(model.window_sizes):
                flex_block_mask(MAX_SEQ_LEN, window, device)
        model = torch.compile(model, dynamic=False)

    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=device)
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
        sync_device(BACKEND)
        t0 = time.time()
        for micro_step in range(grad_accum_steps):
            with autocast_ctx:
                loss = model(x, y)
            train_loss = loss.detach()
            loss = loss / grad_accum_steps
            loss.backward()
            x, y, epoch = next(train_loader)

        # Progress and schedules
        progress = min(total_training_time / TIME_BUDGET, 1.0)
        lrm = get_lr_multiplier(progress)
        muon_momentum = get_muon_momentum(step)
        muon_weight_decay = get_weight_decay(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay
        optimizer.step()
        model.zero_grad(set_to_none=True)

        train_loss_f = train_loss.item()

        # Fast fail: abort if the loss is exploding or not a number
        if not math.isfinite(train_loss_f) or train_loss_f > 100:
            print()
            print("FAIL")
            sys.exit(1)

        sync_device(BACKEND)
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

    model.eval()
    if RUN_DIR:  # the agent loop scores the exported model in a separate process (prepare.py --evaluate)
        print("Training complete. Exporting...", flush=True)
        attention = sdpa_attention  # FlexAttention is a higher-order op the sealed evaluator does not run: same math
        export_model(model, tokenizer, DEVICE_BATCH_SIZE)
        val_bpb = None
    else:
        print("Training complete. Evaluating...", flush=True)
        with autocast_ctx:
            val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)

    t_end = time.time()
    # the steps from warmup_steps on were timed
    steady_state_mfu = (100 * num_flops_per_token * TOTAL_BATCH_SIZE * (step - warmup_steps) / total_training_time / peak_flops
                        if total_training_time > 0 and peak_flops else 0.0)
    peak_vram_mb = get_peak_memory_mb(BACKEND)

    print_summary(val_bpb=val_bpb, training_seconds=total_training_time, total_seconds=t_end - t_start,
                  peak_vram_mb=peak_vram_mb, mfu_percent=steady_state_mfu, total_tokens_M=total_tokens / 1e6,
                  num_steps=step, num_params_M=num_params / 1e6, depth=DEPTH, backend=BACKEND, chip=chip)
