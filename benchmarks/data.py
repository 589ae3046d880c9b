"""
Data pipeline benchmark: tokenizer training, token cache, dataloader throughput (one core) and the time of a full
evaluation on the `cpu` profile with the CPU default model.

    uv run benchmarks/data.py                                 # ../shared/data/bench-corpus if present, else generated
    uv run benchmarks/data.py --corpus DIR                    # any folder of climbmix-layout shards
    uv run benchmarks/data.py --generated                     # generated text, large enough for a full evaluation
Prints a table; writes only into a temporary cache dir (or --cache DIR).
"""

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.join(os.path.dirname(ROOT), "shared", "data", "bench-corpus")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="folder with shard_*.parquet (default: the bench corpus)")
    ap.add_argument("--generated", action="store_true",
                    help="use a generated corpus even if the bench corpus exists (its validation split is large "
                         "enough for a full EVAL_TOKENS evaluation)")
    ap.add_argument("--cache", default=None, help="cache dir to use (default: a temporary one, removed at the end)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per loader measurement")
    args = ap.parse_args()

    cache = args.cache or tempfile.mkdtemp(prefix="ar-bench-")
    os.environ.update(AUTORESEARCH_CACHE_DIR=cache, AUTORESEARCH_DATASET="bench", AUTORESEARCH_PROFILE="cpu")
    for var in ("AUTORESEARCH_MAX_SEQ_LEN", "AUTORESEARCH_EVAL_TOKENS"):
        os.environ.pop(var, None)
    sys.path.insert(0, ROOT)
    import prepare

    data = prepare.data_dir("bench")
    os.makedirs(data, exist_ok=True)
    corpus = None if args.generated else (args.corpus or (DEFAULT_CORPUS if os.path.isdir(DEFAULT_CORPUS) else None))
    if corpus:
        shards = sorted(glob.glob(os.path.join(corpus, "shard_*.parquet")))
        if not shards:
            sys.exit(f"error: no shard_*.parquet in {corpus}")
        for s in shards:
            shutil.copy(s, data)
        source = f"{corpus} ({len(shards)} shards)"
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import datagen
        datagen.write_climbmix_layout(data, n_train_shards=4, docs_per_shard=3000, n_val_docs=700)
        source = "generated word-soup corpus (4 train shards x 3000 docs, 700 validation docs)"
    rows = [("corpus", source)]

    t0 = time.time()
    enc = prepare.train_tokenizer("bench")
    rows.append(("tokenizer training", f"{time.time() - t0:.1f} s ({enc.n_vocab} tokens)"))
    tok = prepare.Tokenizer(enc, prepare.tokenizer_dir("bench"))
    t0 = time.time()
    prepare.tokenize_dataset(tok, "bench")
    n_tokens = sum(len(prepare.tokenize_shard(tok, p)[0])
                   for p in prepare.list_shards("train") + prepare.list_shards("val"))
    rows.append(("token cache build", f"{time.time() - t0:.1f} s ({n_tokens:,} tokens)"))

    # Dataloader throughput, pinned to one core
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch
    torch.set_num_threads(1)
    for B, T, kind in [(8, 512, "numpy"), (8, 512, "torch"), (32, 2048, "numpy"), (32, 2048, "torch")]:
        it = (prepare.iter_batches(tok, B, T, "train") if kind == "numpy"
              else prepare.make_dataloader(tok, B, T, "train", device="cpu"))
        next(it)
        n, t0 = 0, time.time()
        while time.time() - t0 < args.seconds:
            next(it)
            n += 1
        rate = n * B * T / (time.time() - t0)
        rows.append((f"loader B={B} T={T} ({kind}, 1 core)", f"{rate / 1e6:.2f} M tokens/s"))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count())))
    torch.set_num_threads(os.cpu_count())

    # Full evaluation on the cpu profile, with the CPU default model of train.py (random weights: same cost)
    os.environ["AUTORESEARCH_TRAIN_BACKEND"] = "cpu"
    import train
    cfg = train.build_model_config(train.DEPTH, tok.get_vocab_size())
    model = train.GPT(cfg)
    model.init_weights()
    prepare.eval_rows(tok, prepare.MAX_SEQ_LEN)   # build the fixed eval set first (not part of the eval time)
    t0 = time.time()
    bpb = prepare.evaluate_bpb(model, tok, train.DEVICE_BATCH_SIZE)
    dt = time.time() - t0
    n_eval = prepare.eval_rows(tok, prepare.MAX_SEQ_LEN).shape[0] * prepare.MAX_SEQ_LEN
    params = sum(p.numel() for p in model.parameters())
    rows.append(("eval model", f"depth {train.DEPTH}, dim {cfg.n_embd}, {params / 1e6:.1f}M params, "
                               f"batch {train.DEVICE_BATCH_SIZE}, T={prepare.MAX_SEQ_LEN}"))
    rows.append(("full cpu-profile evaluation", f"{dt:.1f} s for {n_eval:,} tokens "
                                               f"(EVAL_TOKENS={prepare.EVAL_TOKENS:,}; untrained bpb {bpb:.2f})"))

    width = max(len(k) for k, _ in rows)
    print()
    print(f"{'measure':<{width}}  result")
    print(f"{'-' * width}  {'-' * 40}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if not args.cache:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
