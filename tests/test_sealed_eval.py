"""The sealed evaluation with the real trainers and the real prepare.py: the trainer exports, the evaluator (run as
the engine runs it, tui.sealed) scores the export with evaluate_bpb's rows and math, and what an exported program may
not do (run code while torch loads it, keep state, look ahead at the targets) is refused."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainers import uniform_bpb
from trainer_fixtures import (ROOT, TINY_SEQ_LEN, parse_summary, run_script, scrubbed_env, tiny_dataset,  # noqa: F401
                              tiny_scripts)
from tui.executor import RunSpec
from tui.sealed import Evaluator, SealedResult

EXPORT_KEYS = ["training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M", "num_steps",
               "num_params_M", "depth", "backend", "chip"]  # the summary of an exporting run: no val_bpb line


def sealed(run_dir, env, timeout=600.0):
    """The evaluator exactly as the engine runs it after a trainer ended."""
    spec = RunSpec(commit="-", script="train.py", seed=None, budget=1.0, dataset="tiny", deadline=timeout,
                   log_path=None, env=scrubbed_env(**env), run_dir=Path(run_dir))
    return Evaluator(ROOT).evaluate(spec, kill_grace=1.0)


def python(code, env, cwd, *args):
    """Run code with the trainer copies in cwd importable (AUTORESEARCH_TRAIN_BACKEND=cpu: imported, not run)."""
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       env=scrubbed_env(**env, PYTHONPATH=ROOT, AUTORESEARCH_TRAIN_BACKEND="cpu"), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def exporting_run(script, env, run_dir, **extra):
    run_dir.mkdir()
    r = run_script(script, env, AUTORESEARCH_RUN_DIR=run_dir, **extra)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Training complete. Exporting..." in r.stdout and "Exported the model for the sealed evaluation" in r.stdout
    assert list(parse_summary(r.stdout)) == EXPORT_KEYS
    return json.loads((run_dir / "export.json").read_text())


IN_PROCESS_TORCH = """
import sys, torch, prepare, train
program = torch.export.load(sys.argv[1])  # our own export: trusted here
tokenizer = prepare.Tokenizer.from_directory()
model = train.GPT(train.build_model_config(train.DEPTH, tokenizer.get_vocab_size()))
model.load_state_dict(program.state_dict)
model.eval()
print(prepare.evaluate_bpb(model, tokenizer, train.DEVICE_BATCH_SIZE))
"""


def test_torch_trainer_exports_and_the_sealed_val_bpb_is_the_in_process_one(tiny_dataset, tmp_path):
    tiny_scripts(tmp_path)
    meta = exporting_run(tmp_path / "train.py", tiny_dataset, tmp_path / "run", AUTORESEARCH_BACKEND="cpu")
    assert meta == {"format": "torch.export", "file": "model.pt2", "batch": 8, "seq_len": TINY_SEQ_LEN,
                    "vocab": meta["vocab"]}
    result = sealed(tmp_path / "run", tiny_dataset)
    assert isinstance(result, SealedResult), result
    assert result.tokens > 0 and result.model == "model.pt2" and result.val_bpb < 0.8 * uniform_bpb(tiny_dataset)
    same_model = float(python(IN_PROCESS_TORCH, tiny_dataset, tmp_path, tmp_path / "run" / "model.pt2"))
    assert result.val_bpb == pytest.approx(same_model, rel=1e-6)


def test_mlx_trainer_exports_a_model_the_evaluator_scores(tiny_dataset, tmp_path):
    tiny_scripts(tmp_path)
    meta = exporting_run(tmp_path / "train_mlx.py", tiny_dataset, tmp_path / "run")
    assert meta["format"] == "mlx.export_function" and (tmp_path / "run" / "model.mlxfn").is_file()
    result = sealed(tmp_path / "run", tiny_dataset)
    assert isinstance(result, SealedResult), result
    assert result.val_bpb < 0.8 * uniform_bpb(tiny_dataset)


IN_PROCESS_MLX = """
import sys, mlx.core as mx, prepare, train_mlx
from mlx.utils import tree_map
mx.random.seed(0)
tokenizer = prepare.Tokenizer.from_directory()
model = train_mlx.GPT(train_mlx.build_model_config(train_mlx.DEPTH, tokenizer.get_vocab_size()))
model.init_weights()
model.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.parameters()))  # no zero projections
mx.eval(model.parameters())
value = prepare.evaluate_bpb(model, tokenizer, train_mlx.DEVICE_BATCH_SIZE)
prepare.export_model(model, tokenizer, train_mlx.DEVICE_BATCH_SIZE, run_dir=sys.argv[1])
print(value)
"""


def test_mlx_sealed_val_bpb_is_the_in_process_one(tiny_dataset, tmp_path):
    tiny_scripts(tmp_path)
    in_process = float(python(IN_PROCESS_MLX, tiny_dataset, tmp_path, tmp_path / "run"))
    result = sealed(tmp_path / "run", tiny_dataset)
    assert isinstance(result, SealedResult), result
    assert result.val_bpb == pytest.approx(in_process, rel=1e-5)


# ---------------------------------------------------------------------------
# Crafted .pt2 archives: what torch.export.load would run, refused before torch reads it
# ---------------------------------------------------------------------------

B, T, V = 2, 8, 50
SKIPPED = ("archive_format", "archive_version", ".data/version", ".data/serialization_id")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def toy_export(tmp_path, monkeypatch):
    """A legitimate export of a small model, and a way to tamper with its records."""
    import torch
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")  # the loader sets it to 1 in this process: undo after

    class Toy(torch.nn.Module):
        def __init__(self, in_place=False):
            super().__init__()
            self.emb, self.out, self.in_place = torch.nn.Embedding(V, 16), torch.nn.Linear(16, V), in_place

        def forward(self, idx):
            x = self.emb(idx)
            if self.in_place:
                x += 1.0
            return self.out(x)

    def export(path, in_place=False):
        torch.export.save(torch.export.export(Toy(in_place), (torch.zeros(B, T, dtype=torch.long),)), path)
        return path

    def tamper(path, program=None, records=None):
        reader, records, out = PT2ArchiveReader(str(export(tmp_path / "toy.pt2"))), dict(records or {}), path
        with PT2ArchiveWriter(str(out)) as writer:
            for name in reader.get_file_names():
                if name in SKIPPED:
                    continue
                data = records.pop(name, None) or reader.read_bytes(name)
                if name == "models/model.json" and program is not None:
                    edited = json.loads(data)
                    program(edited)
                    data = json.dumps(edited).encode()
                writer.write_bytes(name, data)
            for name, data in records.items():
                writer.write_bytes(name, data)
        return out

    return export, tamper, PT2ArchiveReader


def test_a_legitimate_export_loads_and_runs(toy_export, tmp_path):
    import prepare
    import torch
    export, _, _ = toy_export
    module = prepare._load_torch_program(str(export(tmp_path / "ok.pt2")), B, T)
    assert module(torch.zeros(B, T, dtype=torch.long)).shape == (B, T, V)


def test_guard_code_in_an_archive_runs_under_torch_but_is_refused(toy_export, tmp_path):
    import prepare
    import torch
    _, tamper, _ = toy_export
    marker = tmp_path / "guard-ran"
    path = tamper(tmp_path / "guard.pt2", program=lambda p: p.__setitem__(
        "guards_code", [f"__import__('pathlib').Path({str(marker)!r}).touch() is None"]))
    torch.export.load(str(path)).module()(torch.zeros(B, T, dtype=torch.long))
    assert marker.exists()  # the attack is real: torch.export.load runs it
    marker.unlink()
    with pytest.raises(prepare.ExportError, match="guard code"):
        prepare._load_torch_program(str(path), B, T)
    assert not marker.exists()


def test_a_pickled_weight_runs_under_torch_but_is_refused(toy_export, tmp_path):
    import prepare
    import torch
    _, tamper, Reader = toy_export
    marker = tmp_path / "pickle-ran"
    config = json.loads(Reader(str(toy_export[0](tmp_path / "src.pt2"))).read_string(
        "data/weights/model_weights_config.json"))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    path = tamper(tmp_path / "pickle.pt2", records={
        "data/weights/model_weights_config.json": json.dumps(config).encode(),
        f"data/weights/{first['path_name']}": pickle.dumps(_Evil(marker))})
    try:
        torch.export.load(str(path))
    except Exception:
        pass
    assert marker.exists()  # the attack is real: the loader unpickles weights with weights_only=False
    marker.unlink()
    with pytest.raises(prepare.ExportError, match="pickle"):
        prepare._load_torch_program(str(path), B, T)
    assert not marker.exists()


def _retarget(program, target):
    program["graph_module"]["graph"]["nodes"][0]["target"] = target


@pytest.mark.parametrize("edit, records, message", [
    (lambda p: _retarget(p, "torch.os.system"), None, "calls torch.os.system"),
    (lambda p: _retarget(p, "torch.ops.aten.from_file.default"), None, "does not run"),
    (lambda p: _retarget(p, "torch.ops.higher_order.wrap_with_autocast"), None, "only ATen"),
    (lambda p: p.__setitem__("range_constraints", {"s0": {"min_val": 2, "max_val": 9}}), None, "symbolic"),
    (None, {"data/aotinductor/model/model.so": b"\x7fELF"}, "compiled code"),
    (lambda p: p["graph_module"]["signature"]["output_specs"].append(p["graph_module"]["signature"]["output_specs"][0]),
     None, "one output"),
])
def test_archives_that_name_code_or_state_are_refused(toy_export, tmp_path, edit, records, message):
    import prepare
    _, tamper, _ = toy_export
    with pytest.raises(prepare.ExportError, match=message):
        prepare._load_torch_program(str(tamper(tmp_path / "bad.pt2", program=edit, records=records)), B, T)


def test_an_in_place_op_in_forward_is_refused_with_what_to_write(toy_export, tmp_path):
    import prepare
    export, _, _ = toy_export
    with pytest.raises(prepare.ExportError, match=r"in-place operator aten\.add_.*x = x \+ y"):
        prepare._load_torch_program(str(export(tmp_path / "inplace.pt2", in_place=True)), B, T)


def _look_ahead_inputs():
    import numpy as np
    return np.random.default_rng(0).integers(0, V, size=(B, T))


def test_a_torch_model_that_looks_ahead_at_the_targets_is_refused(tmp_path, monkeypatch):
    import prepare
    import torch
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")

    class NextToken(torch.nn.Module):  # "predicts" each target by reading it: the next input token
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(30.0))

        def forward(self, idx):
            return self.scale * torch.nn.functional.one_hot(torch.roll(idx, -1, 1), V).float()

    path = tmp_path / "peek.pt2"
    torch.export.save(torch.export.export(NextToken(), (torch.zeros(B, T, dtype=torch.long),)), str(path))
    program, x = prepare._TorchProgram(str(path), B, T), _look_ahead_inputs()
    with pytest.raises(prepare.ExportError, match="looks ahead.*a causal model is required"):
        prepare._check_causal(program, x, program.forward(x), B, V)


def test_an_mlx_model_that_looks_ahead_at_the_targets_is_refused_and_a_causal_one_passes(tmp_path):
    import mlx.core as mx
    import prepare
    table = mx.random.normal((V, V))
    peek = lambda idx: 30.0 * (mx.roll(idx, -1, axis=1)[..., None] == mx.arange(V)).astype(mx.float32)  # noqa: E731
    causal = lambda idx: table[idx]  # noqa: E731  (a bigram model: position t sees token t only)
    for name, fn in (("peek", peek), ("causal", causal)):
        mx.export_function(str(tmp_path / f"{name}.mlxfn"), fn, mx.zeros((B, T), dtype=mx.int32))
    x = _look_ahead_inputs()
    program = prepare._MlxProgram(str(tmp_path / "causal.mlxfn"), B, T)
    prepare._check_causal(program, x, program.forward(x), B, V)
    program = prepare._MlxProgram(str(tmp_path / "peek.mlxfn"), B, T)
    with pytest.raises(prepare.ExportError, match="looks ahead"):
        prepare._check_causal(program, x, program.forward(x), B, V)


def test_an_export_for_another_shape_is_refused(toy_export, tmp_path):
    import prepare
    export, _, _ = toy_export
    with pytest.raises(prepare.ExportError, match=r"shape \(2, 8\), not \(4, 8\)"):
        prepare._load_torch_program(str(export(tmp_path / "ok.pt2")), 4, T)
