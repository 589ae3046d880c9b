"""
MLX on a CPU (the mlx[cpu] wheel on Linux): a fast BLAS, and the loss head spread over the cores.

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


def parallel_cross_entropy(head, x, targets, reduction="mean"):
    """nn.losses.cross_entropy(head(x), targets, reduction=reduction), with the rows of x split over head_streams().

    MLX runs a CPU stream's element-wise kernels on one thread, and the head's softcap + cross-entropy over
    B x T x vocab logits is mostly tanh and exp: rows i*B/n .. (i+1)*B/n go to stream i and run concurrently
    (1.5 s -> 1.0 s per step on 2 cores). Per-row losses are the same as one call's; with fewer than two streams or
    rows it is that one call."""
    import mlx.core as mx
    import mlx.nn as nn
    B = x.shape[0]
    streams = head_streams()[:B]
    n = len(streams)
    if n < 2:
        return nn.losses.cross_entropy(head(x), targets, reduction=reduction)
    parts = []
    for i, stream in enumerate(streams):
        lo, hi = i * B // n, (i + 1) * B // n
        with mx.stream(stream):
            parts.append(nn.losses.cross_entropy(head(x[lo:hi]), targets[lo:hi], reduction="none"))
    loss = mx.concatenate(parts, axis=0)
    return {"mean": loss.mean(), "sum": loss.sum()}.get(reduction, loss)
