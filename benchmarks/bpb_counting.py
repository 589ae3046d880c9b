"""
How much does our val_bpb differ from upstream's for the same model, from byte counting alone?

prepare.py counts a token's true UTF-8 bytes (tiktoken's decode_single_token_bytes). Upstream counts
len(enc.decode([token]).encode("utf-8")): a token holding part of a multi-byte character decodes to U+FFFD, which is
3 bytes whatever the part's real length. Both sum the same per-token nats over the same targets (every token but the
specials has at least one byte either way), so upstream's bpb is ours x (our bytes / upstream's bytes), for any model;
the script evaluates one model (train.py's GPT at the CPU tier's depth, untrained, seed 0) to show the figure.

    AUTORESEARCH_DATASET=bench uv run benchmarks/bpb_counting.py          # the prepared dataset's evaluation set
    uv run benchmarks/bpb_counting.py --bpb 1.815                         # also scale a trained run's val_bpb
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("AUTORESEARCH_CPU_PEAK_FLOPS", "1e11")  # importing train.py must not measure anything

import numpy as np  # noqa: E402

import prepare  # noqa: E402


def upstream_token_bytes(enc, special_ids):
    """Upstream's table: the length of the decoded string re-encoded, replacement characters included."""
    return np.array([0 if i in special_ids else len(enc.decode([i]).encode("utf-8")) for i in range(enc.n_vocab)],
                    dtype=np.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--bpb", type=float, action="append", default=[], help="a val_bpb of ours to convert as well")
    args = ap.parse_args()
    tok = prepare.Tokenizer.from_directory()
    ours = prepare.get_token_bytes(tok).astype(np.int64)
    special = {i for i in range(len(ours)) if ours[i] == 0}
    theirs = upstream_token_bytes(tok.enc, special)
    partial = np.flatnonzero(ours != theirs)
    rows = prepare.eval_rows(tok, prepare.MAX_SEQ_LEN)
    targets = rows[:, 1:]
    assert ((ours[targets] > 0) == (theirs[targets] > 0)).all(), "both count the same targets"
    in_eval = np.isin(targets, partial)
    ours_total, theirs_total = int(ours[targets].sum()), int(theirs[targets].sum())
    ratio = ours_total / theirs_total

    import torch
    import train
    width = -(-args.depth * train.ASPECT_RATIO // train.HEAD_DIM) * train.HEAD_DIM
    torch.manual_seed(0)
    model = train.GPT(train.build_model_config(args.depth, len(ours)))
    model.init_weights()
    model.eval()
    bpb = prepare.evaluate_bpb(model, tok, 8)

    print(f"dataset {prepare.DATASET}, profile {prepare.PROFILE.describe()}")
    print(f"vocabulary: {len(partial)} of {len(ours)} tokens hold part of a multi-byte character "
          f"(true bytes {int(ours[partial].sum())}, counted by upstream as {int(theirs[partial].sum())})")
    print(f"evaluation set: {targets.size:,} targets, {int(in_eval.sum()):,} of them such tokens "
          f"({100 * in_eval.mean():.3f}%); bytes: ours {ours_total:,}, upstream's {theirs_total:,} "
          f"(upstream's bpb = ours x {ratio:.6f}, {100 * (ratio - 1):+.4f}%)")
    print(f"untrained depth-{args.depth} GPT (width {width}, seed 0): val_bpb ours {bpb:.6f}, upstream's counting "
          f"{bpb * ratio:.6f} (difference {bpb * (ratio - 1):+.6f})")
    for b in args.bpb:
        print(f"val_bpb {b:.6f} of ours is {b * ratio:.6f} counted upstream's way ({b * (ratio - 1):+.6f})")
    assert math.isfinite(bpb)


if __name__ == "__main__":
    main()
