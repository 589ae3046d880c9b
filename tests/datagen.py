"""Small generated corpora and climbmix-layout shards for tests (no network, no ../shared)."""

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

SYLLABLES = ["ka", "lo", "mi", "ra", "tu", "ne", "so", "vi", "de", "pa", "ri", "xo", "ba", "en", "ul", "th", "qu", "an"]


def make_vocabulary(n_words=600, seed=0):
    rng = random.Random(seed)
    words = set()
    while len(words) < n_words:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def make_documents(n_docs, seed=0, min_words=20, max_words=400, vocabulary=None):
    """Zipf-ish word soup with sentences, numbers, punctuation and a little non-ASCII, so BPE has structure to learn
    and a trained model can beat a uniform one."""
    rng = random.Random(seed)
    vocab = vocabulary or make_vocabulary(seed=0)
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    docs = []
    for _ in range(n_docs):
        n = rng.randint(min_words, max_words)
        words = rng.choices(vocab, weights, k=n)
        out, sentence_start = [], True
        for i, w in enumerate(words):
            if sentence_start:
                w = w.capitalize()
                sentence_start = False
            out.append(w)
            r = rng.random()
            if r < 0.08:
                out[-1] += "."
                sentence_start = True
            elif r < 0.12:
                out[-1] += ","
            elif r < 0.13:
                out.append(str(rng.randint(0, 2026)))
            elif r < 0.135:
                out.append(rng.choice(["café", "naïve", "—", "你好", "über"]))
        docs.append(" ".join(out) + ".")
    return docs


def write_parquet(path, texts, column="text", extra=None):
    cols = {column: pa.array(texts, type=pa.string())}
    for k, v in (extra or {}).items():
        cols[k] = pa.array(v)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=256)


def write_climbmix_layout(directory, n_train_shards=2, docs_per_shard=300, n_val_docs=60, seed=0):
    """shard_00000.. plus the pinned validation shard_06542, like karpathy/climbmix-400b-shuffle."""
    for i in range(n_train_shards):
        write_parquet(os.path.join(directory, f"shard_{i:05d}.parquet"), make_documents(docs_per_shard, seed=seed + i))
    write_parquet(os.path.join(directory, "shard_06542.parquet"), make_documents(n_val_docs, seed=seed + 999))
