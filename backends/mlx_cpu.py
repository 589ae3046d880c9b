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

# -----------------------------------------------------------------------------
# exp and tanh from multiplies and adds
#
# The mlx-cpu wheel is built for baseline x86-64 (SSE2, no FMA): its exp and tanh kernels run scalar code with libm
# calls for every float (16 ns each on a 2-core EPYC), and every logit of the head needs one of each. Written as MLX
# multiplies, adds and bit shifts, mx.compile fuses them into loops the wheel's compiler vectorizes. The head avoids
# minimum, maximum and where on the logits: the wheel compiles those with a branch per float, which also stops the
# loop around them from vectorizing.

# exp(r) on [-ln2/2, ln2/2], degree 6, fitted here for relative error (1.9e-9 in float64; 9.6e-8 in float32)
_EXP_POLY = (1.0, 1.0, 0.49999991059303284, 0.16666419804096222, 0.04166822507977486, 0.008374815806746483,
             0.0013836842263117433)
_LN2_HI, _LN2_LO = 0.693359375, -2.1219444005469057e-4  # ln 2 = HI + LO; k * HI is exact in float32 for |k| < 2**15
_ROUND = 12582912.0  # 1.5 * 2**23: y + _ROUND - _ROUND rounds a float32 |y| < 2**22 to the nearest integer
_TANH_KNEE = 9.0     # tanh(9) is 1 in float32


def exp_nonpositive(a):
    """exp(a) for float32 a in [-80, 0] (the caller keeps it there), as 2**k * exp(r) with k = round(a / ln 2) put
    into the exponent bits, r = a - k ln 2 in two parts (one rounding, not |k| ulps), and exp(r) from _EXP_POLY:
    within 2e-7 relative (4 ns per float against mx.exp's 16)."""
    import mlx.core as mx
    k = (a * 1.4426950408889634 + _ROUND) - _ROUND  # round(a * log2(e))
    r = (a - k * _LN2_HI) - k * _LN2_LO
    p = _EXP_POLY[-1]
    for c in _EXP_POLY[-2::-1]:
        p = p * r + c
    return p * ((k + 127.0).astype(mx.int32) << 23).view(mx.float32)


def tanh(u):
    """tanh(u) for float32 u, as (1 - e) / (1 + e) with e = exp(-2|u|), within 2e-7; NaN for NaN and for +-inf.

    |u| above _TANH_KNEE is pulled back to about the knee (tanh is 1 there in float32) so that exp_nonpositive stays
    in range; below it the factor is exactly 1, so |u| is unchanged."""
    import mlx.core as mx
    a = mx.abs(u)
    d = a - _TANH_KNEE
    excess = 0.5 * d + 0.5 * mx.abs(d)  # max(|u| - knee, 0): exactly 0 below the knee, no overflow near 3e38
    e = exp_nonpositive(-2.0 * (a * (_TANH_KNEE / (_TANH_KNEE + excess))))
    return mx.sign(u) * ((1.0 - e) / (1.0 + e))


FIXED_SHIFT_CAP = 40.0  # up to this cap, logit - cap lies in [-2 cap, 0], exp_nonpositive's range: no row max needed


def _chunk_loss(x, weight, targets, cap, with_grad):
    """Per-row losses of one chunk of rows (ignored targets -1 give 0) and, with_grad, the gradients of their sum
    for x and weight. cap is a Python float."""
    import mlx.core as mx
    t = tanh((x @ weight.T).astype(mx.float32) / cap)  # softcapped logits / cap
    if cap <= FIXED_SHIFT_CAP:  # softcapped logits are at most cap: shift every row by it
        top = cap
        p = exp_nonpositive(cap * t - cap)
    else:  # exp(cap) would overflow fp32 from cap ~ 88: shift each row by its max (a rare cap: speed is moot)
        logits = t * cap
        top = mx.max(logits, axis=1, keepdims=True)
        p = mx.exp(logits - top)
    sumexp = mx.sum(p, axis=1, keepdims=True)
    valid = targets != -1
    index = mx.maximum(targets, 0)[:, None]
    loss = mx.where(valid, (mx.log(sumexp) + top - cap * mx.take_along_axis(t, index, axis=1)).squeeze(1), 0.0)
    if not with_grad:
        return loss, None, None
    onehot = mx.arange(weight.shape[0])[None, :] == index
    row_scale = valid[:, None] / sumexp  # 0 for ignored rows: a product, not a select (see above)
    grad = ((p * row_scale - onehot * valid[:, None]) * (1 - t * t)).astype(x.dtype)
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


_fused = {}


def _fused_loss(cap):
    """(loss sum, its gradient for x, for weight) as an mx.custom_function whose vjp only scales the gradients
    formed with the loss: the loss ends the graph, so nothing is recomputed."""
    if cap not in _fused:
        import mlx.core as mx

        @mx.custom_function
        def fused(x, weight, targets):
            loss, grad_x, grad_w = _chunks(x, weight, targets, cap, True)
            return loss.sum(), grad_x, grad_w

        @fused.vjp
        def fused_vjp(primals, cotangents, outputs):
            scale = cotangents[0]
            return outputs[1] * scale, outputs[2] * scale, mx.zeros_like(primals[2])

        _fused[cap] = fused
    return _fused[cap]


def softcap_cross_entropy(x, weight, targets, cap, reduction="mean"):
    """nn.losses.cross_entropy(cap * tanh((x @ weight.T).astype(float32) / cap), targets, reduction=reduction),
    targets -1 ignored (a mean over the others), for x (..., D), weight (V, D), targets (...).

    MLX runs a CPU stream's element-wise kernels on one thread, and at the CPU default the softcap + cross-entropy
    over 4,096 x 8,192 logits is most of a step (tanh and exp on every logit, and their backward). Here the rows go in
    chunks dealt over head_streams() to run concurrently, with one tanh and one exp per logit, both the mul/add
    versions above; for "mean" and "sum" the gradients are formed with the loss and the backward only scales them
    (forward + backward over 4,096 rows on a 2-core EPYC: 2.5 s for the plain lines, 0.66 s here, 1.04 s with MLX's
    own tanh and exp). On Metal (no head streams) it is the plain lines."""
    import mlx.core as mx
    import mlx.nn as nn
    rows, flat, cap = x.reshape(-1, x.shape[-1]), targets.reshape(-1), float(cap)
    if head_streams() and reduction != "none":
        total = _fused_loss(cap)(rows, weight, flat)[0]
    else:
        loss = _chunks(rows, weight, flat, cap, False) if head_streams() else nn.losses.cross_entropy(
            cap * mx.tanh((rows @ weight.T).astype(mx.float32) / cap), flat, reduction="none") * (flat != -1)
        if reduction == "none":
            return loss.reshape(targets.shape)
        total = loss.sum()
    return total / mx.maximum((flat != -1).sum(), 1) if reduction == "mean" else total
