"""Prompt building, answer parsing and applying edits, for both edit scopes.

scope "hparams": the model sees the hyperparameter block and answers DESCRIPTION / REASONING / CODE, CODE being the
new block. The marker banners are always rebuilt from the current script, so a missing, doubled or mangled marker in
the answer can never break the script for the next experiment.
scope "file": the model sees the whole training script and answers DESCRIPTION / REASONING followed by one or more
SEARCH/REPLACE blocks; each SEARCH text must occur exactly once, and no block may be labelled with another file (a
line like "prepare.py" or "File: prepare.py" just above it, or a fence ```python prepare.py around it) even when its
SEARCH text also occurs in the training script.
A structured answer (tui.answers: a JSON object the provider's schema support constrains) carries the same content:
for hparams the block's names with a new literal value (or null: unchanged), which rewrite just those assignments of the
block; for file the search/replace edits. Both end as one Proposal that apply_proposal applies.
An answer is also checked for what it means: placeholder text copied from the format is refused, and so is a change
that removes a name the rest of the script still uses (tui.answer_checks). One exception keeps a weak model's usable
change: a description or reasoning copied from the format is never used, but the change itself says what was done,
so the engine writes the description from it ("MATRIX_LR = 0.03", "edit: x = norm(x) * 2") instead of asking again.
Anything wrong raises AnswerError with a message written for the model: the orchestrator sends it back once as a
corrective retry.

Parsing is linear in the answer's length (no pattern lets whitespace run across lines from every line start), and
answers and edited scripts have size caps, so a runaway reply cannot stall the loop.
"""

import ast
import difflib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from tui.answer_checks import dropped_names, placeholder_in, templates
from tui.results import group_experiments

# ---------------------------------------------------------------------------
# Markers and formats
# ---------------------------------------------------------------------------

BANNER_RE = re.compile(r"^\s*#\s*-{3,}\s*$")
HPARAMS_RE = re.compile(r"^\s*#\s*Hyperparameters\b")
SETUP_RE = re.compile(r"^\s*#\s*Setup\b")
SEARCH_RE = re.compile(r"^\s*<{5,9}\s*SEARCH\s*$")
DIVIDER_RE = re.compile(r"^\s*={5,9}\s*$")
REPLACE_RE = re.compile(r"^\s*>{5,9}\s*REPLACE\s*$")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
# tolerates **DESCRIPTION:** and ## REASONING:, and a markdown heading of the name alone on its line ("## Description",
# "**Code**") with the text on the lines below; the prefix stays on its line ([^\S\n] is whitespace but a newline)
FIELD_RE = (r"^(?:[^\S\n]|[*#>_])*{name}[\s*_]*:[\s*_]*"
            r"|^[^\S\n]*(?:#{{1,6}}|\*\*)[^\S\n]*{name}[^\S\n]*(?:\*\*)?[^\S\n]*\n\s*")
REASONING_END_RE = re.compile(r"^[^\S\n]*(<{5,9}\s*SEARCH|```|~~~)", re.MULTILINE)
# a file label above a SEARCH block: a line ending in a .py path, after at most LABEL_WORDS other words ("File:",
# "In", "Changes to") or with a colon after the path, markdown decoration aside; or a fence's info string naming one
# (```python prepare.py)
LABEL_WORDS = 4
PY_PATH_RE = re.compile(r"[\w./\\-]*\w\.py")  # fullmatch on one word only: searching a long line would be quadratic
NOT_PATH_RE = re.compile(r"[^\w./\\-]+")

SCOPES = ("hparams", "file")
ANSWER_FORMATS = ("auto", "json", "text")  # auto: structured where the provider offers it, else free text
CRASH_TAIL_CHARS = 3000
DESCRIPTION_MAX = 200
MAX_REPLY_CHARS = 256 * 1024  # a real answer is a few KB; max_tokens 4096 is about 16 KB
MAX_SCRIPT_GROWTH = 4  # an edited script may be at most this many times the current one ...
MIN_SCRIPT_CAP = 64 * 1024  # ... or this many characters, whichever is more (the file scope sends it every prompt)

FORMAT_HPARAMS = """DESCRIPTION: <one line, under 80 characters, saying what you changed>
REASONING: <2-3 sentences: why you expect this to lower val_bpb>
CODE:
```python
<the complete new hyperparameter block: every line between the "# Hyperparameters" banner and the "# Setup" banner>
```"""

FORMAT_FILE = """DESCRIPTION: <one line, under 80 characters, saying what you changed>
REASONING: <2-3 sentences: why you expect this to lower val_bpb>
<<<<<<< SEARCH
<lines copied exactly from the current script>
=======
<the lines that replace them>
>>>>>>> REPLACE
(one or more SEARCH/REPLACE blocks; each SEARCH text must match the current script exactly, whitespace included,
and occur exactly once; include enough surrounding lines to make it unique)"""


# the structured format: what each field holds (also the descriptions in its JSON schema, tui.answers)
FIELD_HELP = {
    "description": "what you changed, in one line under 80 characters",
    "reasoning": "why you expect this change to lower val_bpb, in 2-3 sentences",
    "hparams": ("every constant of the block by name: null keeps today's value; the ones you change get their new "
                "value as a Python literal in a string, e.g. \"0.03\", \"2 ** 18\", \"(0.9, 0.95)\", \"'SSSL'\"; "
                "a number stays a number, a string stays a string"),
    "search": "lines copied exactly from the current script, whitespace included; they must occur exactly once",
    "replace": "the lines that replace them",
}
TOOL_NAME = "propose_experiment"  # the tool / schema name of a structured answer
JSON_INTRO = f"one JSON object (when a {TOOL_NAME} tool is offered, call it: this object is its input):"
FORMAT_JSON_HPARAMS = f"""{JSON_INTRO}
- description: {FIELD_HELP["description"]}
- reasoning: {FIELD_HELP["reasoning"]}
- hparams: {FIELD_HELP["hparams"]}"""
FORMAT_JSON_FILE = f"""{JSON_INTRO}
- description: {FIELD_HELP["description"]}
- reasoning: {FIELD_HELP["reasoning"]}
- edits: one or more {{"search": {FIELD_HELP["search"]}, "replace": {FIELD_HELP["replace"]}}}"""
# what a copied-back format looks like: its "<...>" templates, and the structured format's field descriptions
TEMPLATES = templates(FORMAT_HPARAMS, FORMAT_FILE)
HELP_PHRASES = tuple(FIELD_HELP.values())
WHOLE_PLACEHOLDER_RE = re.compile(r"<[^<>\n]*>")


class AnswerError(ValueError):
    """The answer cannot be used; the message tells the model what was wrong."""


class ScriptError(RuntimeError):
    """The training script itself lacks what the scope needs (e.g. no hyperparameter markers)."""


@dataclass
class Proposal:
    description: str
    reasoning: str
    code: str | None = None  # scope hparams, free text: the new block body
    values: dict | None = None  # scope hparams, structured: {name: its new value as Python literal source}
    edits: list = field(default_factory=list)  # scope file: [(search, replace), ...]
    files: list = field(default_factory=list)  # scope file: the .py files the answer labels its blocks with
    labelled_by_engine: list = field(default_factory=list)  # "description"/"reasoning" copied from the format,
    # replaced from the change (apply_proposal)


# ---------------------------------------------------------------------------
# The hyperparameter block
# ---------------------------------------------------------------------------


@dataclass
class HparamsSpan:
    lines: list  # the script's lines (with line endings)
    start: int  # first banner line of the opening marker
    body_start: int  # first line after the opening marker
    body_end: int  # first line of the closing marker (the banner before "# Setup", or "# Setup" itself)

    @property
    def block(self) -> str:
        """Opening marker + body, as shown to the model."""
        return "".join(self.lines[self.start:self.body_end])

    @property
    def body(self) -> str:
        return "".join(self.lines[self.body_start:self.body_end])


def find_hparams(source: str) -> HparamsSpan:
    lines = source.splitlines(keepends=True)
    i_h = next((i for i, ln in enumerate(lines) if HPARAMS_RE.match(ln)), None)
    if i_h is None:
        raise ScriptError("the training script has no '# Hyperparameters' marker comment; restore it or use "
                          "--scope file")
    i_s = next((i for i in range(i_h + 1, len(lines)) if SETUP_RE.match(lines[i])), None)
    if i_s is None:
        raise ScriptError("the training script has no '# Setup' marker comment after the hyperparameter block; "
                          "restore it or use --scope file")
    start = i_h - 1 if i_h > 0 and BANNER_RE.match(lines[i_h - 1]) else i_h
    body_start = i_h + 2 if i_h + 1 < i_s and BANNER_RE.match(lines[i_h + 1]) else i_h + 1
    body_end = i_s - 1 if i_s - 1 >= body_start and BANNER_RE.match(lines[i_s - 1]) else i_s
    return HparamsSpan(lines, start, body_start, body_end)


def _clean_block(code: str) -> str:
    """The model's CODE -> a block body: markers it copied (or half-copied, or doubled) are dropped."""
    lines = code.replace("\r\n", "\n").split("\n")
    while lines and (not lines[0].strip() or BANNER_RE.match(lines[0]) or HPARAMS_RE.match(lines[0])):
        lines.pop(0)
    cut = next((i for i, ln in enumerate(lines) if SETUP_RE.match(ln)), None)
    if cut is not None:
        lines = lines[:cut]
    while lines and (not lines[-1].strip() or BANNER_RE.match(lines[-1])):
        lines.pop()
    if not lines:
        raise AnswerError("the CODE section is empty: send the complete hyperparameter block")
    return "\n".join(ln.rstrip() for ln in lines) + "\n"


_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)


def _literal(node) -> bool:
    """Numbers, strings, booleans, None, containers of them, and arithmetic on them (2 ** 19, -0.5)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float, str, bool, type(None)))
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _literal(k) for k in node.keys) and all(_literal(v) for v in node.values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _literal(node.operand)
    return isinstance(node, ast.BinOp) and isinstance(node.op, _ARITHMETIC) and _literal(node.left) \
        and _literal(node.right)


def _assignments(body) -> dict:
    """name -> ast.dump of its value, for the plain `NAME = value` statements of a block."""
    out = {}
    for stmt in body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]):
                if isinstance(t, ast.Name):
                    out[t.id] = ast.dump(stmt.value)
    return out


def check_block(tree: ast.Module, span: "HparamsSpan", source: str) -> None:
    """The hyperparameter scope edits values, nothing else: every statement assigns a literal to a name of the block
    (or keeps the value it has today, e.g. `_hp = suggest_hyperparameters(...)`, `DEPTH = _hp["depth"]`). A name the
    script binds outside the block (an import such as evaluate_bpb or TIME_BUDGET, a function) can never be rebound."""
    script = ast.parse(source)
    first, last = span.body_start + 1, span.body_end  # the block's line numbers (1-based, inclusive)
    inside = [n for n in script.body if first <= n.lineno <= last]
    today = _assignments(inside)
    outside = set()
    for node in script.body:
        if first <= node.lineno <= last:
            continue
        for n in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign,
                                                      ast.AugAssign)) else [node]:
            if isinstance(n, ast.alias):
                outside.add((n.asname or n.name).split(".")[0])
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                outside.add(n.id)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            outside.add(node.name)
    for stmt in tree.body:
        line = f"line {stmt.lineno} of the block"
        targets = stmt.targets if isinstance(stmt, ast.Assign) else []  # (an annotation would run code too)
        if len(targets) != 1 or not isinstance(targets[0], ast.Name):
            raise AnswerError(f"the hyperparameter block may only contain `NAME = value` lines ({line} is not one)")
        name, value = targets[0].id, stmt.value
        if name.startswith("__") or (name in outside and name not in today):
            raise AnswerError(f"{name} is defined outside the hyperparameter block ({line}): the block may only set "
                              f"its own constants")
        kept = today.get(name) == ast.dump(value)
        own = isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name) and value.value.id in today \
            and _literal(value.slice)
        if not (_literal(value) or kept or own):
            raise AnswerError(f"{name} must be set to a literal value such as a number, a string or a tuple ({line}): "
                              f"no calls, names or expressions")


def replace_hparams(source: str, code: str) -> str:
    span = find_hparams(source)
    body = _clean_block(code)
    try:
        tree = ast.parse(body)
    except SyntaxError as e:
        raise AnswerError(f"the new hyperparameter block is not valid Python: {e.msg} "
                          f"(line {e.lineno} of the block)") from None
    if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)):
        raise AnswerError("the hyperparameter block must not import anything: only change values")
    check_block(tree, span, source)
    if span.body.endswith(("\n\n", "\n\r\n")):
        body += "\n"  # keep the blank lines the script had around the block
    if span.body.startswith(("\n", "\r\n")):
        body = "\n" + body
    return "".join(span.lines[:span.body_start]) + body + "".join(span.lines[span.body_end:])


def _block_assignments(span: HparamsSpan) -> dict:
    """name -> its last plain `NAME = value` statement in the block (line numbers relative to the block body)."""
    try:
        tree = ast.parse(span.body)
    except SyntaxError:
        raise ScriptError("the hyperparameter block of the training script is not valid Python on its own; fix it "
                          "or use --scope file") from None
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            out[stmt.targets[0].id] = stmt
    return out


def hparam_kinds(source: str) -> dict:
    """The names a structured answer may set, the block's own constants (helpers such as _hp are not values), each
    with the kind of value (_kind) it has today; None where that cannot be told (e.g. `DEPTH = _hp["depth"]`)."""
    return {name: _kind(stmt.value) for name, stmt in _block_assignments(find_hparams(source)).items()
            if not name.startswith("_")}


def hparam_names(source: str) -> list:
    return list(hparam_kinds(source))


_NUMBERS = ("an integer", "a number")


def _kind(node) -> str | None:
    """What sort of value a literal expression is, for the type check of structured values; None: cannot tell.
    "an integer" is also "a number" (a float constant may be set to 1), but not the other way round."""
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            return "a boolean"
        if isinstance(v, int):
            return "an integer"
        if isinstance(v, (float, complex)):
            return "a number"
        return "a string" if isinstance(v, str) else ("None" if v is None else None)
    if isinstance(node, ast.UnaryOp):
        return _kind(node.operand) if _kind(node.operand) in _NUMBERS else None
    if isinstance(node, ast.BinOp):
        kinds = {_kind(node.left), _kind(node.right)}
        if kinds <= set(_NUMBERS):
            return "an integer" if kinds == {"an integer"} and not isinstance(node.op, ast.Div) else "a number"
        return "a string" if "a string" in kinds else None
    if isinstance(node, ast.IfExp):  # WINDOW_PATTERN = "L" if _hp["tier"] == "cpu" else "SSSL": a string either way
        return _kind(node.body) if _kind(node.body) == _kind(node.orelse) else None
    if isinstance(node, (ast.Tuple, ast.List)):
        return "a tuple or list"
    return {ast.Set: "a set", ast.Dict: "a dict"}.get(type(node))


def _new_value(name: str, text, old) -> str:
    """The Python source of a structured value, checked: a literal of the kind the block's value has today."""
    if not isinstance(text, str):  # a server that does not constrain decoding may send a bare JSON value
        text = repr(tuple(text) if isinstance(text, list) else text)
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        node = None
    if node is None or not _literal(node):
        raise AnswerError(f"the value of {name} ({text.strip()[:80]!r}) is not a Python literal: write it as in "
                          f"the script, e.g. \"0.02\", \"(0.9, 0.95)\" or \"'SSSL'\" (quotes inside for a string)")
    was, now = _kind(old), _kind(node)
    if was not in (None, "None") and now != was and not (was == "a number" and now == "an integer"):
        raise AnswerError(f"{name} is {was} in the block, but the answer sets it to {now or 'something else'} "
                          f"({text.strip()[:80]}): keep its type")
    source = text.strip()
    return ast.unparse(node) if "\n" in source else source


def set_hparams(source: str, values: dict) -> str:
    """The script with just these assignments of the block rewritten (banners, comments and every other line kept).
    Only names the block defines may be set, each to a literal of the kind it has today."""
    if not values:
        raise AnswerError("the answer sets no hyperparameter: give at least one name and its new value")
    span = find_hparams(source)
    today = _block_assignments(span)
    allowed = hparam_names(source)
    unknown = [n for n in values if n not in allowed]
    if unknown:
        raise AnswerError(f"the block has no constant named {', '.join(unknown)}: set only names it defines "
                          f"({', '.join(allowed)})")
    lines = span.body.split("\n")  # numbered as ast numbers them
    # rewrite from the last value up, so the positions of the ones above stay valid; ast offsets count UTF-8 bytes
    for name in sorted(values, key=lambda n: (today[n].value.lineno, today[n].value.col_offset), reverse=True):
        value = today[name].value
        new = _new_value(name, values[name], value)
        first, last = lines[value.lineno - 1].encode(), lines[value.end_lineno - 1].encode()
        text = (first[:value.col_offset] + new.encode() + last[value.end_col_offset:]).decode()
        lines[value.lineno - 1:value.end_lineno] = [text]
    return "".join(span.lines[:span.body_start]) + "\n".join(lines) + "".join(span.lines[span.body_end:])


# ---------------------------------------------------------------------------
# Answer parsing
# ---------------------------------------------------------------------------


def _field(text: str, name: str) -> re.Match | None:
    return re.search(FIELD_RE.format(name=name), text, re.IGNORECASE | re.MULTILINE)


def _strip_fences(text: str) -> str:
    """The first fenced block's content if there is one, else the text itself."""
    lines = text.split("\n")
    opens = [i for i, ln in enumerate(lines) if FENCE_RE.match(ln)]
    if not opens:
        return text
    first = opens[0]
    close = next((i for i in opens if i > first), None)
    return "\n".join(lines[first + 1:close] if close is not None else lines[first + 1:])


def _file_label(line: str) -> str | None:
    """The .py path a line names as the file being edited ("prepare.py", "**File:** `prepare.py`", "In prepare.py:"),
    or None for any other line."""
    words = line.replace("`", "").replace("*", "").strip().lstrip("#>").split()
    if not words:
        return None
    path = words[-1].removesuffix(":")
    if PY_PATH_RE.fullmatch(path) and (len(words) <= LABEL_WORDS + 1 or words[-1].endswith(":")):
        return path
    return None


def parse_edits(text: str) -> tuple[list, list]:
    """The SEARCH/REPLACE blocks, and the files they are labelled with: the nearest non-blank line above a block
    (looking past an opening fence) or the info string of the fence around it."""
    edits, files, mode, search, replace = [], [], None, [], []
    label = fence_label = None
    in_fence = False
    for line in text.split("\n"):
        if mode is None and not line.strip():
            continue  # blank lines between blocks change nothing (and are most of a runaway reply)
        if SEARCH_RE.match(line):
            if mode is not None:
                raise AnswerError("a SEARCH block was opened before the previous one was closed with '>>>>>>> REPLACE'")
            mode, search, replace = "search", [], []
            files += [f for f in (label, fence_label) if f]
            label = None
        elif mode == "search" and DIVIDER_RE.match(line):
            mode = "replace"
        elif mode == "replace" and REPLACE_RE.match(line):
            edits.append(("\n".join(search), "\n".join(replace)))
            mode = None
        elif mode == "search":
            search.append(line)
        elif mode == "replace":
            replace.append(line)
        elif FENCE_RE.match(line):
            in_fence = not in_fence
            info = NOT_PATH_RE.split(FENCE_RE.sub("", line, count=1)) if in_fence else []
            fence_label = next((w for w in info if PY_PATH_RE.fullmatch(w)), None)
            if not in_fence:
                label = None  # a label above a fenced block of something else does not reach past it
        else:
            label = _file_label(line)
    if mode is not None:
        raise AnswerError("a SEARCH/REPLACE block is not closed: each needs '=======' and '>>>>>>> REPLACE' lines")
    return edits, files


def parse_answer(text: str, scope: str) -> Proposal:
    text = text or ""
    if len(text) > MAX_REPLY_CHARS:
        raise AnswerError(f"the answer is {len(text):,} characters, over the {MAX_REPLY_CHARS:,} allowed: send only "
                          f"DESCRIPTION, REASONING and the edit")
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise AnswerError("the answer was empty")
    d = _field(text, "DESCRIPTION")
    if not d:
        raise AnswerError("the answer has no 'DESCRIPTION:' line")
    description = " ".join(text[d.end():].split("\n", 1)[0].replace("*", "").split())[:DESCRIPTION_MAX]
    if not description:
        raise AnswerError("the DESCRIPTION line is empty")
    r = _field(text, "REASONING")
    if scope == "hparams":
        c = _field(text, "CODE")
        if not c:
            raise AnswerError("the answer has no 'CODE:' section with the new hyperparameter block")
        reasoning = text[r.end():c.start()].strip() if r and r.start() < c.start() else ""
        code = _strip_fences(text[c.end():])
        if not code.strip():
            raise AnswerError("the CODE section is empty: send the complete hyperparameter block")
        return Proposal(description, reasoning, code=code)
    edits, files = parse_edits(text)
    if not edits:
        raise AnswerError("the answer has no SEARCH/REPLACE block ('<<<<<<< SEARCH' ... '=======' ... "
                          "'>>>>>>> REPLACE')")
    reasoning = ""
    if r:
        rest = text[r.end():]
        stop = REASONING_END_RE.search(rest)
        reasoning = (rest[:stop.start()] if stop else rest).strip()
    return Proposal(description, reasoning, edits=edits, files=files)


# ---------------------------------------------------------------------------
# Applying and validating
# ---------------------------------------------------------------------------


def apply_edits(source: str, edits: list) -> str:
    text = source
    for i, (search, replace) in enumerate(edits, 1):
        if not search.strip():
            raise AnswerError(f"SEARCH block {i} is empty: copy the lines to replace from the current script")
        n = text.count(search)
        if n == 0:
            hint = (" (it differs only in whitespace or indentation: copy the lines exactly)"
                    if " ".join(search.split()) in " ".join(text.split()) else "")
            raise AnswerError(f"SEARCH block {i} does not match the current script{hint}")
        if n > 1:
            raise AnswerError(f"SEARCH block {i} matches {n} places: include more surrounding lines so it is unique")
        text = text.replace(search, replace, 1)
    return text


def _placeholder(where: str, text: str) -> str | None:
    found = placeholder_in(text, TEMPLATES, HELP_PHRASES)
    if found is None and where in ("description", "reasoning") and WHOLE_PLACEHOLDER_RE.fullmatch(text.strip()):
        found = text.strip()
    return found


def check_placeholders(proposal: Proposal) -> list:
    """Refuse an answer that copies the format's placeholders back instead of filling them in. A copied description
    or reasoning is only a missing label of a change that says in full what it does: the names of the labels to write
    from the change are returned instead (the copied text is never used)."""
    fields = [("CODE section", proposal.code or "")]
    for i, (search, replace) in enumerate(proposal.edits, 1):
        fields += [(f"SEARCH text of block {i}", search), (f"REPLACE text of block {i}", replace)]
    fields += [(f"value of {name}", str(v)) for name, v in (proposal.values or {}).items()]
    for where, text in fields:
        if found := _placeholder(where, text):
            raise AnswerError(f"the {where} is the placeholder \"{found}\" copied from the answer format: replace "
                              f"every placeholder with your own content")
    return [where for where, text in (("description", proposal.description), ("reasoning", proposal.reasoning))
            if _placeholder(where, text)]


def describe_change(source: str, new: str, scope: str) -> str:
    """A description written from the change itself: "MATRIX_LR = 0.03, DEPTH = 6" for the hyperparameter block, the
    first line a file edit writes ("edit: x = norm(x) * 2 (+3 more lines)") for the file scope."""
    if scope == "hparams":
        span = find_hparams(new)
        old, now = _block_assignments(find_hparams(source)), _block_assignments(span)
        changed = [f"{name} = {ast.get_source_segment(span.body, stmt.value)}" for name, stmt in now.items()
                   if name not in old or ast.dump(old[name].value) != ast.dump(stmt.value)]
        return ", ".join(changed)[:DESCRIPTION_MAX] or "hyperparameter change"
    changed = [ln for ln in difflib.unified_diff(source.splitlines(), new.splitlines(), lineterm="", n=0)
               if ln[:1] in "+-" and not ln.startswith(("+++", "---")) and ln[1:].strip()]
    written = [" ".join(ln[1:].split()) for ln in changed if ln[0] == "+"]
    if not written:  # only deletions
        return f"edit: remove {' '.join(changed[0][1:].split())}"[:DESCRIPTION_MAX] if changed else "edit"
    more = f" (+{len(written) - 1} more lines)" if len(written) > 1 else ""
    return f"edit: {written[0]}"[:DESCRIPTION_MAX - len(more)] + more


def check_names_kept(old_tree: ast.Module, new_tree: ast.Module, scope: str) -> None:
    """Refuse a change that removes a name the script still uses: it would be committed and die with NameError."""
    gone = dropped_names(old_tree, new_tree)
    if not gone:
        return
    names = ", ".join(gone[:20]) + (f" and {len(gone) - 20} more" if len(gone) > 20 else "")
    if scope == "hparams":
        raise AnswerError(f"the block no longer defines {names}, which the script still uses: send the complete "
                          f"block, every line between the banners, changing only values")
    raise AnswerError(f"the edit removes {names}, which the script still uses: keep their definitions or change "
                      f"every use")


def apply_proposal(source: str, proposal: Proposal, scope: str, filename: str = "train.py") -> str:
    """The new script text; raises AnswerError when the edit cannot be used."""
    copied = check_placeholders(proposal)
    if scope == "hparams" and proposal.values is not None:
        new = set_hparams(source, proposal.values)
    elif scope == "hparams":
        new = replace_hparams(source, proposal.code or "")
    else:
        own = PurePosixPath(filename).name
        other = next((f for f in proposal.files if PurePosixPath(f.replace("\\", "/")).name != own), None)
        if other:  # refused even when the SEARCH text also occurs in the script: it was meant for the other file
            raise AnswerError(f"you may only edit {filename}; {other} is read-only: send SEARCH/REPLACE blocks for "
                              f"{filename} only")
        new = apply_edits(source, proposal.edits)
    cap = max(MAX_SCRIPT_GROWTH * len(source), MIN_SCRIPT_CAP)
    if len(new) > cap:
        raise AnswerError(f"the edited script would be {len(new):,} characters, over the limit of {cap:,}: make a "
                          f"smaller change")
    if new == source:
        raise AnswerError("the edit changes nothing: propose an actual change")
    try:
        tree = compile(new, filename, "exec", ast.PyCF_ONLY_AST)
        compile(tree, filename, "exec")
    except SyntaxError as e:
        where = f"line {e.lineno}: {e.text.strip()}" if e.text else f"line {e.lineno}"
        raise AnswerError(f"the edited script does not compile: {e.msg} at {where}") from None
    except ValueError as e:  # e.g. null bytes
        raise AnswerError(f"the edited script does not compile: {e}") from None
    try:
        old_tree = ast.parse(source)
    except SyntaxError:
        old_tree = None
    if old_tree is not None and ast.dump(tree) == ast.dump(old_tree):
        raise AnswerError("the edit changes only comments or whitespace: propose a change that does something")
    if old_tree is not None:
        check_names_kept(old_tree, tree, scope)
    if copied:  # only now: a change refused above must not have its labels rewritten
        proposal.labelled_by_engine = copied
        if "description" in copied:
            proposal.description = describe_change(source, new, scope)
        if "reasoning" in copied:
            proposal.reasoning = ""
    return new


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


@dataclass
class PromptContext:
    exp: int
    scope: str
    script_name: str
    source: str
    history: list  # results rows of this tag, oldest first
    history_len: int = 30
    best_val_bpb: float | None = None
    best_exp: int | None = None
    hardware: dict = field(default_factory=dict)
    backend: str | None = None
    dataset: str = "climbmix"
    time_budget: float = 300.0
    last_crash: str | None = None  # "expN (description):\n<tail of its output>"
    notes: list = field(default_factory=list)  # extra guidance (plateau, noise floor, ...) from later features
    running: list = field(default_factory=list)  # "expN: description" of each experiment in flight (several slots)
    script_lines: int | None = None  # scope file: show only the script's first N lines (tui.context fits the prompt)


def format_for(scope: str, structured: bool) -> str:
    if structured:
        return FORMAT_JSON_HPARAMS if scope == "hparams" else FORMAT_JSON_FILE
    return FORMAT_HPARAMS if scope == "hparams" else FORMAT_FILE


def system_prompt(scope: str, script_name: str, time_budget: float, structured: bool = False) -> str:
    if scope == "hparams":
        what = (f"You may change only the hyperparameter block of {script_name} (the lines between the "
                f"'# Hyperparameters' and '# Setup' marker comments): values of existing constants, or new constants "
                f"that the block defines. No imports, and no changes to the model, optimizer, data or evaluation code.")
    else:
        what = (f"You may change anything in {script_name}: hyperparameters, the model, the optimizer, the training "
                f"loop. prepare.py and backends/ are read-only (they hold the data, tokenizer and evaluation); a run "
                f"that modifies them counts as a crash. Do not add dependencies. Keep the output format the script "
                f"prints (the progress lines and the '---' summary), or the run counts as a crash.")
    return f"""You are an autonomous ML researcher improving a small GPT pretraining script.
Each experiment trains for a fixed budget of {time_budget:.0f} seconds and is then evaluated on held-out data.
The metric is val_bpb (validation bits per byte): lower is better. An experiment that reliably beats the best so far
is kept (the script stays changed); otherwise it is reverted.
val_bpb is computed by fixed code from the model the script exports at its end (prepare.export_model: torch.export or
mx.export_function of forward(idx) -> logits), never from what the script prints, so the model must stay exportable
(no data-dependent Python control flow or in-place ops in forward) and causal, and a run that exports no model is a
crash.

{what}

Guidance:
- Make ONE change per experiment so its effect can be attributed.
- Do not repeat experiments that already failed; after several discards in a row, try a different direction.
- The time budget is fixed: more optimizer steps within it usually help; smaller models or batches give more steps,
  but too small hurts quality. Running out of memory or time is a crash.
- Read the crash output if the last experiment crashed, and avoid the cause.

Answer in exactly this format, nothing else:
{format_for(scope, structured)}"""


def format_history(rows: list, limit: int) -> str:
    """One line per experiment; val_bpb is the mean over the experiment's runs (confirmation and noise runs)."""
    if not rows:
        return "No experiments yet: the baseline has not run."
    groups = group_experiments(rows)
    shown = groups[-limit:] if limit > 0 else []
    out = [f"{'exp':<6} {'status':<8} {'val_bpb':>9} {'runs':>4} {'mem_gb':>7} {'steps':>6}  description / notes"]
    if len(groups) > len(shown):
        out.append(f"({len(groups) - len(shown)} earlier experiments not shown)")
    for e in shown:
        r, status, mean = e.first, e.status, e.mean
        val = "-" if status in ("crash", "skip") else (f"{mean:.6f}" if mean is not None else "-")
        runs = "-" if status == "skip" else str(e.runs)
        desc = e.description[:80]
        note = " ".join(e.rows[-1].notes.split())[:100]
        if note and status in ("crash", "skip", "discard"):
            desc = f"{desc} [{note}]"
        text = r.format()
        out.append(f"{text['exp']:<6} {status:<8} {val:>9} {runs:>4} {text['memory_gb']:>7} {text['steps']:>6}  {desc}")
    return "\n".join(out)


def format_hardware(hw: dict, backend: str | None) -> str:
    if not hw:
        return f"backend {backend or 'unknown'}"
    parts = [str(hw.get("chip_name") or hw.get("kind") or "unknown device")]
    if hw.get("memory_gb"):
        parts.append(f"{float(hw['memory_gb']):.0f} GB memory")
    if hw.get("gpu_cores"):
        parts.append(f"{hw['gpu_cores']} GPU cores")
    if hw.get("peak_flops"):
        parts.append(f"~{float(hw['peak_flops']) / 1e12:.1f} TFLOPS peak")
    parts.append(f"backend {backend or hw.get('kind') or 'unknown'}")
    return ", ".join(parts)


def user_prompt(ctx: PromptContext) -> str:
    if ctx.best_val_bpb is None:
        best = "Best val_bpb so far: none (no successful run yet)."
    else:
        best = f"Best val_bpb so far: {ctx.best_val_bpb:.6f} (exp{ctx.best_exp})."
    parts = [
        f"Training script: {ctx.script_name}. Dataset: {ctx.dataset}. Time budget: {ctx.time_budget:.0f} s.",
        f"Hardware: {format_hardware(ctx.hardware, ctx.backend)}.",
        best,
        "",
        "Results so far (oldest first):",
        format_history(ctx.history, ctx.history_len),
    ]
    if ctx.running:
        parts += ["", "Experiments training right now (no results yet; do not propose these again):"]
        parts += [f"- {line}" for line in ctx.running]
    if ctx.last_crash:
        parts += ["", "The most recent crash, end of its output:", "```", ctx.last_crash[-CRASH_TAIL_CHARS:], "```"]
    if ctx.scope == "hparams":
        block = find_hparams(ctx.source).block
        parts += ["", f"Current hyperparameter block of {ctx.script_name}:", "```python", block.rstrip("\n"), "```"]
    else:
        lines = ctx.source.rstrip("\n").split("\n")
        shown = lines if ctx.script_lines is None else lines[:ctx.script_lines]
        parts += ["", f"Current {ctx.script_name}:", "```python", *shown, "```"]
        if len(shown) < len(lines):
            parts.append(f"(lines {len(shown) + 1}-{len(lines)} of {ctx.script_name} are not shown: the model's "
                         f"context window is too small for the whole script; edit only the lines shown)")
    parts += [""] + [str(n) for n in ctx.notes]
    parts.append(f"Propose experiment {ctx.exp}: ONE change, in the answer format.")
    return "\n".join(parts)


def corrective_prompt(error: str, scope: str, structured: bool = False) -> str:
    return (f"Your answer could not be used: {error}.\n"
            f"Reply again with the complete answer in exactly this format:\n{format_for(scope, structured)}")


EXCERPT_HEAD, EXCERPT_TAIL = 1200, 400  # characters of an unusable answer shown back to the model


def answer_excerpt(text: str) -> str:
    """What the corrective retry shows of an unusable answer: all of a short one, else its start and its end (the
    error says what was wrong; the whole runaway reply again would only fill the context)."""
    text = text.strip()
    if not text:
        return "(empty answer)"
    if len(text) <= EXCERPT_HEAD + EXCERPT_TAIL + 100:
        return text
    left = len(text) - EXCERPT_HEAD - EXCERPT_TAIL
    return f"{text[:EXCERPT_HEAD]}\n[... {left:,} characters of this answer left out ...]\n{text[-EXCERPT_TAIL:]}"
