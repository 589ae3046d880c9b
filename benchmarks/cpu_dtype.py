"""
Does bf16 make a CPU training step faster? train.py's model and optimizer step at the CPU tier's shape, fp32 against
bf16 autocast, steps interleaved (fp32, bf16, fp32, ...) so a change in the machine's load hits both alike; beside it
the GEMMs that backends.hardware.choose_cpu_dtype measures, so its rule can be checked against whole steps.

    uv run benchmarks/cpu_dtype.py                    # depth 3 (width 256), 8 x 512 tokens: the CPU default
    uv run benchmarks/cpu_dtype.py --depth 8 --steps 6
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("AUTORESEARCH_CPU_PEAK_FLOPS", "1e11")  # importing train.py must not measure anything

import torch  # noqa: E402

import train  # noqa: E402
from backends.hardware import _gemm_library, _time_rounds, model_gemms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per dtype (after 2 warm-up steps each)")
    args = ap.parse_args()
    width = -(-args.depth * train.ASPECT_RATIO // train.HEAD_DIM) * train.HEAD_DIM
    cfg = train.GPTConfig(sequence_len=args.seq_len, vocab_size=8192, n_layer=args.depth, n_head=width // 128,
                          n_kv_head=width // 128, n_embd=width, window_pattern=train.WINDOW_PATTERN)
    torch.manual_seed(0)
    model = train.GPT(cfg)
    model.init_weights()
    opt = model.setup_optimizer()
    x = torch.randint(0, 8192, (args.batch, args.seq_len))
    y = torch.randint(0, 8192, (args.batch, args.seq_len))

    def step(dtype):
        t0 = time.perf_counter()
        with torch.amp.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {torch.float32: [], torch.bfloat16: []}
    for i in range(args.steps + 2):
        for dtype in times:
            dt = step(dtype)
            if i >= 2:
                times[dtype].append(dt)
    rows = args.batch * args.seq_len
    _, library, make_matmul = _gemm_library()
    gemm = {}
    for name, dtype in (("fp32", "fp32"), ("bf16", "bf16")):
        total = 0.0
        for m, k, n in model_gemms(width, rows):
            flop = 2 * m * k * n
            total += flop / max(_time_rounds(make_matmul(m, k, n, dtype), flop, rounds=3))
        gemm[name] = total
    f32, b16 = statistics.median(times[torch.float32]), statistics.median(times[torch.bfloat16])
    print(f"depth {args.depth}, width {width}, {args.batch} x {args.seq_len} tokens, {torch.get_num_threads()} threads, "
          f"{library}")
    print(f"step  fp32 median {f32 * 1e3:.0f} ms (min {min(times[torch.float32]) * 1e3:.0f}), "
          f"bf16 median {b16 * 1e3:.0f} ms (min {min(times[torch.bfloat16]) * 1e3:.0f}): bf16 step speed-up {f32 / b16:.2f}x")
    print(f"model GEMMs fp32 {gemm['fp32'] * 1e3:.1f} ms, bf16 {gemm['bf16'] * 1e3:.1f} ms: "
          f"bf16 GEMM speed-up {gemm['fp32'] / gemm['bf16']:.2f}x")


if __name__ == "__main__":
    main()
