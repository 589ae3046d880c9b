"""
The language-model head's loss for PyTorch, chunked over rows:

    softcap_cross_entropy(x, weight, targets, cap) == F.cross_entropy(cap * tanh((x @ weight.T).float() / cap),
                                                                      targets, ignore_index=-1)

the same maths as those three lines (the GEMM in autocast's dtype when autocast is on, the rest in fp32; float64 in,
float64 throughout), for reduction "mean", "sum" or "none".

Why: at the CPU default (width 128, vocabulary 8,192) a micro-batch of 4,096 tokens has 33.5 M logits, and the
element-wise passes over them (tanh and its backward, log_softmax and its backward, the casts) took most of a step;
GEMMs and attention were 13.6 % of its op time. Here each chunk of rows is small enough to stay in cache, every logit
takes one tanh and one exp, and the gradient is formed in the same pass as the loss, since the loss ends the graph:
backward only scales it. On a 2-core EPYC, for 4,096 rows, the head's forward + backward took 655 -> 200 ms in bf16
and 760 -> 350 ms in fp32, and a 45 s run took ~3x the steps (benchmarks/cpu_sweep.md).

Chunked for "mean" and "sum", and for any reduction under no_grad (evaluation); reduction="none" with gradients
(the losses then feed more graph) runs the plain three lines.
"""

import torch
import torch.nn.functional as F

CHUNK_ROWS = 256  # 256 x 8,192 fp32 logits = 8 MiB: fastest of 64..4096 rows on the EPYC, 4096 was 2x slower


def _acc(dtype):
    """The dtype of the element-wise maths: fp32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk(x, weight, targets, cap, acc_dtype, with_grad):
    """Per-row losses of one chunk and, with_grad, d(sum of its losses)/d(logits) in x's dtype (ignored rows 0)."""
    t = (x @ weight.t()).to(acc_dtype).div_(cap).tanh_()  # softcapped logits / cap
    logits = t * cap
    top = logits.amax(1, keepdim=True)
    p = logits.sub_(top).exp_()
    sumexp = p.sum(1, keepdim=True)
    index = targets.clamp(min=0)[:, None]
    loss = (sumexp.log() + top - cap * t.gather(1, index)).squeeze(1)
    valid = targets != -1
    loss = loss * valid
    if not with_grad:
        return loss, None
    p.div_(sumexp).scatter_add_(1, index, torch.full_like(sumexp, -1.0))  # softmax - one-hot
    p.mul_(valid[:, None])
    grad = p.mul_(t.mul_(t).neg_().add_(1))  # d logits / d raw = 1 - tanh^2
    return loss, grad.to(x.dtype)


class _SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, cap, dtype, mean):
        acc = _acc(dtype)
        xc, wc = x.to(dtype), weight.to(dtype)
        grad_x = torch.empty(x.shape, dtype=acc, device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device)
        total = torch.zeros((), dtype=acc, device=x.device)
        for lo in range(0, x.shape[0], CHUNK_ROWS):
            rows = xc[lo:lo + CHUNK_ROWS]
            loss, grad = _chunk(rows, wc, targets[lo:lo + CHUNK_ROWS], cap, acc, True)
            total += loss.sum()
            grad_x[lo:lo + CHUNK_ROWS] = grad @ wc
            grad_w += grad.t() @ rows
        n = (targets != -1).sum().clamp(min=1) if mean else torch.ones((), device=x.device)
        ctx.save_for_backward(grad_x, grad_w, n)
        ctx.dtypes = x.dtype, weight.dtype
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_x, grad_w, n = ctx.saved_tensors
        scale = grad_out / n
        return (grad_x * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None, None, None, None


def softcap_cross_entropy(x, weight, targets, cap, reduction="mean"):
    """Cross-entropy of the softcapped logits cap * tanh(x @ weight.T / cap) against targets (-1 = ignored).
    x (..., D), weight (V, D), targets (...). Returns a scalar, or the per-position losses (targets' shape) for
    reduction="none"."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    rows, flat = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            if reduction == "none":  # per-row gradients: the loss is not the end of the graph, so the plain lines
                logits = cap * torch.tanh((rows.to(dtype) @ weight.to(dtype).t()).to(_acc(dtype)) / cap)
                return F.cross_entropy(logits, flat, ignore_index=-1, reduction="none").view(targets.shape)
            return _SoftcapCrossEntropy.apply(rows, weight, flat, float(cap), dtype, reduction == "mean")
        with torch.no_grad():
            acc = _acc(dtype)
            w = weight.to(dtype)
            loss = torch.cat([_chunk(rows[lo:lo + CHUNK_ROWS].to(dtype), w, flat[lo:lo + CHUNK_ROWS], cap, acc,
                                     False)[0] for lo in range(0, rows.shape[0], CHUNK_ROWS)])
    if reduction == "none":
        return loss.view(targets.shape)
    total = loss.sum()
    return total / (flat != -1).sum().clamp(min=1) if reduction == "mean" else total
