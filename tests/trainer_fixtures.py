"""Shared helpers for tests that run the real trainers: a tiny prepared dataset and edited copies of the scripts."""

import os
import re
import shutil
import subprocess
import sys

import pytest

import datagen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SEQ_LEN = 64


def scrubbed_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "HF_"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A dataset 'tiny' prepared through the real `prepare.py --text` path. Returns the env that selects it."""
    base = tmp_path_factory.mktemp("tiny-data")
    src = base / "corpus"
    src.mkdir()
    docs = datagen.make_documents(1500, seed=7, max_words=120)
    (src / "corpus.jsonl").write_text("\n".join('{"text": %s}' % __import__("json").dumps(d) for d in docs))
    env = dict(AUTORESEARCH_CACHE_DIR=str(base / "cache"), AUTORESEARCH_DATASET="tiny", AUTORESEARCH_PROFILE="cpu",
               AUTORESEARCH_MAX_SEQ_LEN=str(TINY_SEQ_LEN), AUTORESEARCH_EVAL_TOKENS="4096",
               AUTORESEARCH_CPU_PEAK_FLOPS="1e11")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--text", str(src), "--name", "tiny"],
                       env=scrubbed_env(**env), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return env


def edit_hparams(source, **values):
    """Set NAME = value lines inside the hyperparameter block, like the agent does."""
    start = source.index("# Hyperparameters (edit these directly")
    end = source.index("# Setup", start)
    block = source[start:end]
    for name, value in values.items():
        block, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", block, flags=re.M)
        assert n == 1, f"{name} not found in the hyperparameter block"
    return source[:start] + block + source[end:]


TINY_MODEL = dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=32, DEVICE_BATCH_SIZE=8, TOTAL_BATCH_SIZE=8 * TINY_SEQ_LEN)


def tiny_scripts(directory, **overrides):
    """Copies of train.py and train_mlx.py with a tiny model (plus overrides) in `directory`."""
    values = {**TINY_MODEL, **overrides}
    for name in ("train.py", "train_mlx.py"):
        with open(os.path.join(ROOT, name)) as f:
            text = edit_hparams(f.read(), **values)
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return directory


def run_script(script, env, budget=2, timeout=240, **extra_env):
    full = scrubbed_env(**env, AUTORESEARCH_TIME_BUDGET=budget, PYTHONPATH=ROOT, **extra_env)
    r = subprocess.run([sys.executable, str(script)], env=full, capture_output=True, timeout=timeout,
                       cwd=os.path.dirname(str(script)))
    # decode by hand: text=True would turn the progress line's \r into \n
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def parse_summary(stdout):
    """The key: value lines after the final '---', as the agent reads them."""
    assert "\n---\n" in stdout, stdout[-2000:]
    block = stdout.rsplit("\n---\n", 1)[1]
    out = {}
    for line in block.splitlines():
        m = re.match(r"^(\w+):\s+(.+?)\s*$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def copy_repo_files(directory):
    """prepare.py and backends/ beside copied scripts (for runs that must not see the real tree)."""
    shutil.copy(os.path.join(ROOT, "prepare.py"), directory)
    shutil.copytree(os.path.join(ROOT, "backends"), os.path.join(directory, "backends"),
                    ignore=shutil.ignore_patterns("__pycache__"))
