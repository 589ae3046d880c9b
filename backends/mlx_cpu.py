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

def preload_openblas():
    """The path of the system OpenBLAS loaded for MLX, or None (not Linux, disabled, none found).

    The mlx-cpu wheel ships a reference BLAS (~35x slower matmuls than OpenBLAS). A system OpenBLAS loaded globally
    before mlx makes MLX's cblas calls resolve to it. AUTORESEARCH_OPENBLAS=0 disables, =PATH picks a file."""
    if sys.platform != "linux" or os.environ.get("AUTORESEARCH_OPENBLAS") == "0":
        return None
    arch = os.uname().machine
    candidates = [os.environ.get("AUTORESEARCH_OPENBLAS"),
                  f"/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
                  f"/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
                  ctypes.util.find_library("openblas")]
    for path in filter(None, candidates):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    return None

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
