"""
MLX on a CPU (the mlx[cpu] wheel on Linux): a fast BLAS.

preload_openblas() only works before mlx is first imported, so this module never imports mlx.
"""

import ctypes
import ctypes.util
import os
import sys

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
