"""
MLX on a CPU (the mlx[cpu] wheel on Linux): a fast BLAS, and the loss head chunked and spread over the cores.

preload_openblas() only works before mlx is first imported, so this module imports mlx inside its functions.
"""

import ctypes
import ctypes.util
import os
import sys

MAX_HEAD_STREAMS = 4  # CPU streams for the loss head; more than the cores only adds scheduling

# -----------------------------------------------------------------------------
# BLAS

def _env_mkl():
    """libmkl_rt installed into this Python environment by PyPI's `mkl` wheel, or None."""
    import glob
    for lib in dict.fromkeys((os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib"))):
        rt = sorted(glob.glob(os.path.join(lib, "libmkl_rt.so*")))
        if rt:
            return rt[0]
    return None


def preload_openblas():
    """The path of the BLAS loaded for MLX, or None (not Linux, disabled, none found).

    The mlx-cpu wheel ships a reference BLAS (~35x slower matmuls than OpenBLAS). A BLAS with the standard cblas
    names loaded globally before mlx makes MLX's cblas calls resolve to it: AUTORESEARCH_OPENBLAS=PATH if set, else
    MKL from PyPI's `mkl` wheel in this environment (a project dependency on x86_64 Linux), else a system OpenBLAS.
    AUTORESEARCH_OPENBLAS=0 disables. (PyPI's scipy-openblas wheels cannot serve: their symbols are scipy_cblas_*.)"""
    if sys.platform != "linux" or os.environ.get("AUTORESEARCH_OPENBLAS") == "0":
        return None
    arch = os.uname().machine
    candidates = [os.environ.get("AUTORESEARCH_OPENBLAS"), _env_mkl(),
                  f"/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
                  f"/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
                  ctypes.util.find_library("openblas")]
    for path in filter(None, candidates):
        try:
            iomp = os.path.join(os.path.dirname(path), "libiomp5.so")
            if blas_name(path) == "MKL" and os.path.exists(iomp):  # MKL's OpenMP runtime (PyPI intel-openmp) sits
                ctypes.CDLL(iomp, mode=ctypes.RTLD_GLOBAL)          # beside it, off the loader's search path
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    return None


def blas_name(path):
    """How the startup line names the BLAS at `path` (from preload_openblas)."""
    return "MKL" if "mkl" in os.path.basename(path).lower() else "OpenBLAS"

# -----------------------------------------------------------------------------
# Loss head over the cores

_head_streams = None


def head_streams():
    """One CPU stream per core (up to MAX_HEAD_STREAMS); none on Metal, where the GPU is parallel already."""
    global _head_streams
    if _head_streams is None:
        import mlx.core as mx
        n = min(MAX_HEAD_STREAMS, os.cpu_count() or 1)
        _head_streams = [] if mx.metal.is_available() else [mx.new_stream(mx.cpu) for _ in range(n)]
    return _head_streams


CHUNK_ROWS = 128  # rows per chunk of the loss head: 128 x 8,192 fp32 logits = 4 MiB (128/256 best on a 2-core EPYC)


def _chunk_loss(x, weight, targets, cap, with_grad):
    """Per-row losses of one chunk of rows (ignored targets -1 give 0) and, with_grad, the gradients of their sum
    for x and weight."""
    import mlx.core as mx
    t = mx.tanh((x @ weight.T).astype(mx.float32) / cap)  # softcapped logits / cap
    logits = t * cap
    top = mx.max(logits, axis=1, keepdims=True)  # exp(cap) overflows fp32 from cap ~ 80
    p = mx.exp(logits - top)
    sumexp = mx.sum(p, axis=1, keepdims=True)
    valid = targets != -1
    index = mx.maximum(targets, 0)[:, None]
    loss = mx.where(valid, (mx.log(sumexp) + top - cap * mx.take_along_axis(t, index, axis=1)).squeeze(1), 0.0)
    if not with_grad:
        return loss, None, None
    onehot = mx.arange(weight.shape[0])[None, :] == index
    grad = mx.where(valid[:, None], (p / sumexp - onehot) * (1 - t * t), 0.0).astype(x.dtype)
    return loss, grad @ weight, grad.T @ x


def _chunks(x, weight, targets, cap, with_grad):
    """_chunk_loss over CHUNK_ROWS-row chunks, dealt round-robin to head_streams() so the cores share them."""
    import mlx.core as mx
    streams = head_streams()
    parts = []
    for k, lo in enumerate(range(0, x.shape[0], CHUNK_ROWS)):
        with mx.stream(streams[k % len(streams)]):
            parts.append(_chunk_loss(x[lo:lo + CHUNK_ROWS], weight, targets[lo:lo + CHUNK_ROWS], cap, with_grad))
    loss = mx.concatenate([part[0] for part in parts])
    if not with_grad:
        return loss
    grad_w = parts[0][2]
    for part in parts[1:]:
        grad_w = grad_w + part[2]
    return loss, mx.concatenate([part[1] for part in parts]), grad_w


_fused = None


def _fused_loss():
    """(loss sum, its gradient for x, for weight) as an mx.custom_function whose vjp only scales the gradients
    formed with the loss: the loss ends the graph, so nothing is recomputed."""
    global _fused
    if _fused is None:
        import mlx.core as mx

        @mx.custom_function
        def fused(x, weight, targets, cap):
            loss, grad_x, grad_w = _chunks(x, weight, targets, cap, True)
            return loss.sum(), grad_x, grad_w

        @fused.vjp
        def fused_vjp(primals, cotangents, outputs):
            scale = cotangents[0]
            return outputs[1] * scale, outputs[2] * scale, mx.zeros_like(primals[2]), mx.zeros_like(primals[3])

        _fused = fused
    return _fused


def softcap_cross_entropy(x, weight, targets, cap, reduction="mean"):
    """nn.losses.cross_entropy(cap * tanh((x @ weight.T).astype(float32) / cap), targets, reduction=reduction),
    targets -1 ignored (a mean over the others), for x (..., D), weight (V, D), targets (...).

    MLX runs a CPU stream's element-wise kernels on one thread, and at the CPU default the softcap + cross-entropy
    over 4,096 x 8,192 logits is most of a step (tanh and exp on every logit, and their backward). Here the rows go in
    chunks that stay in cache, dealt over head_streams() to run concurrently, with one tanh and one exp per logit; for
    "mean" and "sum" the gradients are formed with the loss and the backward only scales them (1.4 s -> 0.65-0.77 s
    for the head's forward + backward on a 2-core EPYC). On Metal (no head streams) it is the plain lines."""
    import mlx.core as mx
    import mlx.nn as nn
    rows, flat = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    if head_streams() and reduction != "none":
        total = _fused_loss()(rows, weight, flat, mx.array(cap, dtype=mx.float32))[0]
    else:
        loss = _chunks(rows, weight, flat, cap, False) if head_streams() else nn.losses.cross_entropy(
            cap * mx.tanh((rows @ weight.T).astype(mx.float32) / cap), flat, reduction="none") * (flat != -1)
        if reduction == "none":
            return loss.reshape(targets.shape)
        total = loss.sum()
    return total / mx.maximum((flat != -1).sum(), 1) if reduction == "mean" else total
