"""Answer parsing and edit application for both scopes: fences, missing/doubled markers, search/replace rules."""

import time
from pathlib import Path

import pytest

from fakes.agent import file_answer, hp_answer, hp_block
from fakes.repo import FAKE_TRAIN
from tui.prompt import (MAX_REPLY_CHARS, AnswerError, PromptContext, ScriptError, apply_proposal, find_hparams,
                        parse_answer, user_prompt)
from tui.results import Row

SOURCE = FAKE_TRAIN.read_text()
BANNER = "# " + "-" * 75
REPO_ROOT = Path(__file__).resolve().parent.parent


def apply(text, scope="hparams", source=SOURCE):
    return apply_proposal(source, parse_answer(text, scope), scope)


def markers_intact(src):
    assert src.count("# Hyperparameters") == 1 and src.count("# Setup") == 1
    span = find_hparams(src)
    compile(src, "train.py", "exec")
    return span.body


def test_plain_answer_replaces_only_the_block():
    new = apply(hp_answer(lr=0.02))
    body = markers_intact(new)
    assert "LEARNING_RATE = 0.02" in body and "LEARNING_RATE = 0.01" not in new
    before, after = SOURCE.split("# Hyperparameters")[0], SOURCE.split("# Setup")[1]
    assert new.startswith(before) and new.endswith(after)


@pytest.mark.parametrize("variant", ["with_markers", "doubled_setup", "no_opening", "no_fence", "bold_fields",
                                     "trailing_chatter"])
def test_marker_and_format_variants_never_break_the_script(variant):
    block = hp_block(lr=0.03)
    head = f"{BANNER}\n# Hyperparameters (edit these directly, no CLI flags needed)\n{BANNER}\n"
    setup = f"{BANNER}\n# Setup\n{BANNER}\n"
    code = {
        "with_markers": f"```python\n{head}\n{block}\n{setup}```",
        "doubled_setup": f"```python\n{block}\n{setup}{setup}```",
        "no_opening": f"```python\n{BANNER}\n{block}```",
        "no_fence": block,
        "bold_fields": f"```python\n{block}```",
        "trailing_chatter": f"```python\n{block}```\nThis should help because reasons.",
    }[variant]
    text = f"DESCRIPTION: lr 0.03\nREASONING: why\nCODE:\n{code}\n"
    if variant == "bold_fields":
        text = text.replace("DESCRIPTION:", "**DESCRIPTION:**").replace("REASONING:", "**REASONING:**")
    p = parse_answer(text, "hparams")
    assert p.description == "lr 0.03"
    body = markers_intact(apply_proposal(SOURCE, p, "hparams"))
    assert "LEARNING_RATE = 0.03" in body and "reasons" not in body


@pytest.mark.parametrize("style", ["## {}", "### {}", "**{}**", "# {}  "])
def test_headings_without_a_colon_name_the_fields_on_the_lines_below(style):
    # "## Description" on its own line, the text under it: how chat models format answers by habit
    head = {name: style.format(name) for name in ("Description", "Reasoning", "Code")}
    text = (f"{head['Description']}\n\nlr 0.03\n\n{head['Reasoning']}\nA higher rate.\nStill short.\n\n"
            f"{head['Code']}\n```python\n{hp_block(lr=0.03)}```\n")
    p = parse_answer(text, "hparams")
    assert (p.description, p.reasoning) == ("lr 0.03", "A higher rate.\nStill short.")
    assert "LEARNING_RATE = 0.03" in markers_intact(apply_proposal(SOURCE, p, "hparams"))
    edit = (f"{head['Description']}\ndeeper\n{head['Reasoning']}\nmore capacity\n"
            f"<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n>>>>>>> REPLACE\n")
    p = parse_answer(edit, "file")
    assert (p.description, p.reasoning) == ("deeper", "more capacity")
    # a heading that merely starts with the name is not the field
    with pytest.raises(AnswerError, match="no 'DESCRIPTION:' line"):
        parse_answer(text.replace(head["Description"], style.format("Description of the idea")), "hparams")


@pytest.mark.parametrize("text,message", [
    ("REASONING: x\nCODE:\nLEARNING_RATE = 1\n", "DESCRIPTION"),
    ("DESCRIPTION: x\nREASONING: y\n", "CODE"),
    ("DESCRIPTION: x\nCODE:\n```python\n```\n", "empty"),
    ("", "empty"),
])
def test_malformed_answers_raise_answer_error(text, message):
    with pytest.raises(AnswerError, match=message):
        apply(text)


def test_invalid_python_imports_and_no_change_are_rejected():
    with pytest.raises(AnswerError, match="not valid Python"):
        apply("DESCRIPTION: x\nCODE:\nLEARNING_RATE = = 2\n")
    with pytest.raises(AnswerError, match="must not import"):
        apply("DESCRIPTION: x\nCODE:\nimport os\nLEARNING_RATE = 0.02\n")
    with pytest.raises(AnswerError, match="changes nothing"):
        apply(hp_answer(lr=0.01))
    with pytest.raises(AnswerError, match="only comments"):
        apply(hp_answer(lr=0.01).replace("# ok | crash", "# a new comment | crash"))
    # a block that parses alone but breaks the file (dedent into nothing is fine, but a dangling try is not)
    with pytest.raises(AnswerError):
        apply("DESCRIPTION: x\nCODE:\ntry:\n    LEARNING_RATE = 0.02\n")


def test_file_scope_search_replace():
    text = ("DESCRIPTION: cheaper loss\nREASONING: r\n```\n<<<<<<< SEARCH\n    loss = 3.0 - 0.1 * step\n=======\n"
            "    loss = 3.0 - 0.2 * step\n>>>>>>> REPLACE\n```\n<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n"
            ">>>>>>> REPLACE\n")
    p = parse_answer(text, "file")
    assert p.reasoning == "r" and len(p.edits) == 2
    new = apply_proposal(SOURCE, p, "file")
    assert "0.2 * step" in new and "DEPTH = 5" in new and new.count("DEPTH = 4") == 0


@pytest.mark.parametrize("search,message", [
    ("print()", "matches"),  # several places
    ("    loss  = 3.0 - 0.1 * step", "whitespace"),  # near miss
    ("this line is not in the script", "does not match"),
])
def test_file_scope_requires_exact_unique_matches(search, message):
    text = f"DESCRIPTION: x\nREASONING: y\n<<<<<<< SEARCH\n{search}\n=======\npass\n>>>>>>> REPLACE\n"
    with pytest.raises(AnswerError, match=message):
        apply(text, "file")


def test_file_scope_unclosed_or_missing_blocks():
    with pytest.raises(AnswerError, match="not closed"):
        parse_answer("DESCRIPTION: x\n<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n", "file")
    with pytest.raises(AnswerError, match="no SEARCH/REPLACE"):
        parse_answer("DESCRIPTION: x\nREASONING: y\nCODE:\nDEPTH = 5\n", "file")


# replies a misbehaving model or server sends, under the size cap; each took minutes with patterns that let
# whitespace run across lines from every line start
BLOCK = "<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n>>>>>>> REPLACE\n"
RUNAWAY = {
    "blank lines, then text": "\n" * 200_000 + "x",
    "whitespace lines": " \t\n" * 60_000 + "x",
    "star lines": "*\n" * 100_000 + "x",
    "blank lines after the fields": "DESCRIPTION: x\nREASONING: y\n" + "\n" * 200_000 + "text\n" + BLOCK,
}


@pytest.mark.parametrize("scope", ["hparams", "file"])
@pytest.mark.parametrize("shape", list(RUNAWAY))
def test_runaway_replies_are_parsed_or_refused_at_once(shape, scope):
    text = RUNAWAY[shape]
    assert len(text) < MAX_REPLY_CHARS
    t0 = time.perf_counter()
    try:
        parse_answer(text, scope)
    except AnswerError:
        pass
    assert time.perf_counter() - t0 < 1.0, f"{shape} ({len(text):,} characters) took too long to parse"


@pytest.mark.parametrize("text", [hp_answer(lr=0.02) + "\n" * (1 << 20), "DESCRIPTION" * 100_000],
                         ids=["valid answer then 1 MB of blank lines", "DESCRIPTION repeated, 1 MB"])
def test_an_oversized_reply_is_refused_with_what_was_wrong(text):
    t0 = time.perf_counter()
    with pytest.raises(AnswerError, match=r"characters, over the 262,144 allowed: send only DESCRIPTION"):
        parse_answer(text, "hparams")
    assert time.perf_counter() - t0 < 1.0


def test_an_edit_that_balloons_the_script_is_refused():
    padding = "".join(f"PAD_{i} = {i}\n" for i in range(8000))  # ~100 KB of valid Python, under the reply cap
    for scope, text in [("file", file_answer([("DEPTH = 4", "DEPTH = 5\n" + padding)])),
                        ("hparams", hp_answer(lr=0.02, extra=padding))]:
        assert len(text) < MAX_REPLY_CHARS
        with pytest.raises(AnswerError, match=r"the edited script would be [\d,]+ characters, over the limit of "
                                              r"65,536: make a smaller change"):
            apply(text, scope)
    assert "PAD_9 = 9" in apply(file_answer([("DEPTH = 4", "DEPTH = 5\n" + padding[:2000])]), "file")


@pytest.mark.parametrize("label", ["prepare.py\n", "File: prepare.py\n", "**File:** `prepare.py`\n",
                                   "In prepare.py:\n", "### prepare.py\n\n", "```python prepare.py\n",
                                   "I also change how the tokenizer is loaded in prepare.py:\n```python\n",
                                   "# prepare.py\n"])
def test_file_scope_edits_labelled_with_another_file_are_refused(label):
    # DEPTH = 4 occurs in the training script too: today's rule (SEARCH must match) alone would apply it there
    text = f"DESCRIPTION: deeper\nREASONING: more capacity\n{label}{BLOCK}" + ("```\n" if "```" in label else "")
    with pytest.raises(AnswerError, match=r"you may only edit train.py; prepare.py is read-only"):
        apply(text, "file")
    second_block_only = f"DESCRIPTION: deeper\nREASONING: r\n{BLOCK}{label}" + BLOCK.replace("5", "6")
    with pytest.raises(AnswerError, match="prepare.py is read-only"):
        apply_proposal(SOURCE, parse_answer(second_block_only, "file"), "file", "train.py")


@pytest.mark.parametrize("label", ["train.py\n", "File: `train.py`\n", "```python train.py\n", "```python\n",
                                   "This keeps the data pipeline of prepare.py untouched and only deepens the model\n"])
def test_file_scope_labels_naming_the_script_or_prose_are_applied(label):
    text = f"DESCRIPTION: deeper\nREASONING: more capacity\n{label}{BLOCK}" + ("```\n" if "```" in label else "")
    assert "DEPTH = 5" in apply(text, "file")
    assert "DEPTH = 5" in apply_proposal(SOURCE, parse_answer(text.replace("train.py", "train_mlx.py"), "file"),
                                         "file", "train_mlx.py")


def test_script_without_markers_is_a_script_error():
    with pytest.raises(ScriptError, match="Hyperparameters"):
        find_hparams("x = 1\n")
    with pytest.raises(ScriptError, match="Setup"):
        find_hparams("# Hyperparameters\nx = 1\n")


def typed(rows):
    return [Row.parse(r) for r in rows]


def test_prompt_contains_history_crash_tail_hardware_and_block():
    rows = [{"exp": "exp0", "status": "keep", "val_bpb": "1.030000", "memory_gb": "0.8", "steps": "5",
             "description": "baseline"},
            {"exp": "exp1", "status": "crash", "val_bpb": "0.000000", "description": "deeper", "notes": "exit code 1"}]
    ctx = PromptContext(exp=2, scope="hparams", script_name="train.py", source=SOURCE, history=typed(rows),
                        best_val_bpb=1.03, best_exp=0, hardware={"chip_name": "Apple M4 Max", "memory_gb": 64},
                        backend="mlx", dataset="climbmix", time_budget=300,
                        last_crash="exp1 (deeper): exit code 1\nValueError: boom", notes=["Plateau: change direction."])
    text = user_prompt(ctx)
    for needle in ("exp1", "crash", "deeper [exit code 1]", "ValueError: boom", "Apple M4 Max", "64 GB",
                   "1.030000 (exp0)", "LEARNING_RATE = 0.01", "Plateau: change direction.", "experiment 2"):
        assert needle in text, needle
    assert "import json" not in text  # hparams scope shows the block, not the file


def test_history_is_bounded():
    rows = [{"exp": f"exp{i}", "status": "discard", "val_bpb": "1.1", "description": f"idea {i}"} for i in range(50)]
    ctx = PromptContext(exp=50, scope="file", script_name="train.py", source=SOURCE, history=typed(rows),
                        history_len=10)
    text = user_prompt(ctx)
    assert "idea 49" in text and "idea 39" not in text and "40 earlier experiments not shown" in text
    assert "import json" in text  # file scope shows the whole script


@pytest.mark.parametrize("name", ["train.py", "train_mlx.py"])
def test_real_trainers_have_a_findable_hyperparameter_block(name):
    path = REPO_ROOT / name
    if not path.exists():
        pytest.skip(f"{name} not written yet")
    span = find_hparams(path.read_text())
    assert "=" in span.body and span.start < span.body_start < span.body_end


# ---------------------------------------------------------------------------
# The hyperparameter scope sets values and nothing else (issue 12, attacks 2 and 3)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("line, why", [
    ("evaluate_bpb = lambda *a, **k: 0.000001", "defined outside"),  # rebinding the evaluation imported above
    ("TIME_BUDGET = 24", "defined outside"),                          # rebinding the budget imported from prepare
    ("__builtins__ = {}", "defined outside"),
    ("DEPTH = int('5')", "literal value"),
    ("LEARNING_RATE = DEPTH * 0.01", "literal value"),
    ("print('hello')", "NAME = value"),
    ("DEPTH: print('annotations run too') = 4", "NAME = value"),
    ("A, B = 1, 2", "NAME = value"),
])
def test_the_hparams_block_accepts_only_literal_assignments_to_its_own_names(line, why):
    script = "from prepare import TIME_BUDGET, evaluate_bpb\n" + SOURCE
    with pytest.raises(AnswerError, match=why):
        apply_proposal(script, parse_answer(hp_answer(extra=line), "hparams"), "hparams")


@pytest.mark.parametrize("script", ["train.py", "train_mlx.py"])
def test_the_real_trainers_blocks_take_value_changes_and_keep_their_computed_defaults(script):
    source = (Path(__file__).resolve().parent.parent / script).read_text()
    body = find_hparams(source).body
    new = apply_proposal(source, parse_answer(hp_answer_with(body.replace("MATRIX_LR = 0.04", "MATRIX_LR = 2 ** -5")),
                                              "hparams"), "hparams")
    assert "MATRIX_LR = 2 ** -5" in new and '_hp["depth"]' in new
    with pytest.raises(AnswerError, match="literal value"):
        apply_proposal(source, parse_answer(hp_answer_with(body.replace('DEPTH = _hp["depth"]', "DEPTH = len(_hp)")),
                                            "hparams"), "hparams")


def hp_answer_with(block: str) -> str:
    return f"DESCRIPTION: change a value\nREASONING: because\nCODE:\n```python\n{block}```\n"
