"""
The loss head alone at the CPU default: softcap + cross-entropy over (rows x vocabulary) logits, forward + backward,
the plain lines against the chunked versions the trainers use (backends/loss_torch.py, backends/mlx_cpu.py).

    uv run benchmarks/loss_head.py                      # 4,096 rows x width 128 x vocabulary 8,192
    uv run benchmarks/loss_head.py --rows 2048 --repeat 10

Prints one table row per (framework, dtype, version): the best and the median of --repeat timed calls after two
warm-up calls, and the ratio to the plain lines. Run it on a quiet machine; it uses every core PyTorch or MLX does.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from backends.mlx_cpu import preload_openblas  # noqa: E402  (before mlx is imported)

CAP = 15.0


def timed(fn, repeat):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def torch_cases(rows, width, vocab):
    import torch
    import torch.nn.functional as F
    from backends.loss_torch import softcap_cross_entropy
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g).requires_grad_()
    w = (torch.randn(vocab, width, generator=g) * 0.05).requires_grad_()
    y = torch.randint(0, vocab, (rows,), generator=g)

    def plain():
        logits = CAP * torch.tanh(F.linear(x, w).float() / CAP)
        return F.cross_entropy(logits, y, ignore_index=-1)

    def step(loss_fn, dtype):
        def run():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = loss_fn()
            loss.backward()
            x.grad = w.grad = None
        return run

    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        yield "PyTorch", name, "plain", step(plain, dtype)
        yield "PyTorch", name, "chunked", step(lambda: softcap_cross_entropy(x, w, y, CAP), dtype)


def mlx_cases(rows, width, vocab):
    import mlx.core as mx
    import mlx.nn as nn
    from backends.mlx_cpu import softcap_cross_entropy
    mx.random.seed(0)
    x = mx.random.normal((rows, width))
    w = mx.random.normal((vocab, width)) * 0.05
    y = mx.random.randint(0, vocab, (rows,))

    def plain(w, x):
        return nn.losses.cross_entropy(CAP * mx.tanh((x @ w.T) / CAP), y, reduction="mean")

    for version, loss_fn in (("plain", plain), ("chunked", lambda w, x: softcap_cross_entropy(x, w, y, CAP))):
        step = mx.compile(mx.value_and_grad(loss_fn, argnums=(0, 1)))  # as the trainer's compiled step
        yield "MLX", "float32", version, lambda step=step: mx.eval(step(w, x))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096, help="tokens per micro-batch (default 4,096 = 8 x 512)")
    ap.add_argument("--width", type=int, default=128, help="model width (default 128)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary (default 8,192)")
    ap.add_argument("--repeat", type=int, default=8, help="timed calls per row (default 8)")
    args = ap.parse_args()
    blas = preload_openblas()
    print(f"rows {args.rows:,}, width {args.width}, vocabulary {args.vocab:,}, {os.cpu_count()} cores, "
          f"MLX BLAS {blas or 'bundled'}\n")
    print("| framework | dtype | version | best ms | median ms | plain / this (best) |\n|---|---|---|---|---|---|")
    plain_best = {}
    for cases in (torch_cases, mlx_cases):
        for framework, dtype, version, fn in cases(args.rows, args.width, args.vocab):
            best, median = timed(fn, args.repeat)
            plain_best.setdefault((framework, dtype), best)
            print(f"| {framework} | {dtype} | {version} | {1e3 * best:.0f} | {1e3 * median:.0f} | "
                  f"{plain_best[(framework, dtype)] / best:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
