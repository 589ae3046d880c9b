"""Trainer output protocol -> StepMetrics / FinalMetrics.

The trainers print a `\\r`-prefixed progress line per step:
    step 00042 (14.0%) | loss: 3.456789 | lrm: 1.00 | dt: 512ms | tok/sec: 4,000 | mfu: 51.2% | epoch: 1 |
        remaining: 258s   (one line)
and, after training, a `---` line followed by `key:<spaces>value` lines (val_bpb, training_seconds, ...), written by
prepare.print_summary (the key order and number formats live there); a trainer run by the engine exports its model and
leaves val_bpb out: the engine's `sealed evaluation: val_bpb X` line after the output gives it (tui.sealed scores the
export), for readers of a log such as the dashboard's watch mode.
Bytes arrive in arbitrary chunks, so decoding is incremental (a multi-byte UTF-8 character split across two reads
stays intact) and lines are split on both `\\r` and `\\n`.
"""

import codecs
import math
import re
from collections import deque
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------
# Protocol constants
# ---------------------------------------------------------------------------

STEP_HEAD_RE = re.compile(r"^step\s+(\d+)\s*\(\s*([\d.]+)\s*%\s*\)")
FINAL_LINE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s+(.*?)\s*$")
BACKEND_RE = re.compile(r"^Backend:\s*(\S+)(?:\s*\((.*)\))?")
SEALED_PREFIX = "sealed evaluation: "  # the engine's line after a run's output (tui.sealed)
SEALED_RE = re.compile(r"^sealed evaluation: val_bpb (\S+)")
FINAL_SEPARATOR = "---"
TAIL_LINES = 60  # lines kept for crash reports (the traceback tail that reaches the next prompt)
MAX_LINE_CHARS = 1 << 20  # output that never ends a line is cut into pieces of this size

# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


@dataclass
class StepMetrics:
    step: int
    pct_done: float
    loss: float | None = None
    lrm: float | None = None
    dt_ms: float | None = None
    tok_per_sec: float | None = None
    mfu: float | None = None
    epoch: int | None = None
    remaining: float | None = None


@dataclass
class FinalMetrics:
    val_bpb: float | None = None  # None: the block had no val_bpb line (the engine's runs get it from tui.sealed)
    training_seconds: float | None = None
    total_seconds: float | None = None
    peak_vram_mb: float | None = None
    mfu_percent: float | None = None
    total_tokens_M: float | None = None
    num_steps: int | None = None
    num_params_M: float | None = None
    depth: int | None = None
    backend: str | None = None
    chip: str | None = None
    extra: dict = field(default_factory=dict)  # keys we do not know (energy lines, future additions)

    @property
    def ok(self) -> bool:
        return self.val_bpb is not None and math.isfinite(self.val_bpb) and self.val_bpb > 0


_FLOAT_KEYS = ("training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M", "num_params_M")
_INT_KEYS = ("num_steps", "depth")


def _number(text: str) -> float | None:
    """'4,000' -> 4000.0, '512ms' -> 512.0, '51.2%' -> 51.2, 'nan' -> nan; None when there is no number."""
    m = re.match(r"\s*([-+]?(?:nan|inf|[\d,]*\.?\d+(?:[eE][-+]?\d+)?))", text, re.IGNORECASE)
    if not m:
        return None
    try:
        return float(m.group(1).replace(",", ""))
    except ValueError:
        return None


def parse_step(line: str) -> StepMetrics | None:
    """One progress line -> StepMetrics. Fields are read one by one, so a changed or missing field loses only itself."""
    parts = [p.strip() for p in line.strip().split("|")]
    m = STEP_HEAD_RE.match(parts[0]) if parts else None
    if not m:
        return None
    sm = StepMetrics(step=int(m.group(1)), pct_done=float(m.group(2)))
    for part in parts[1:]:
        key, _, value = part.partition(":")
        key, num = key.strip().lower(), _number(value)
        if num is None:
            continue
        if key == "loss":
            sm.loss = num
        elif key == "lrm":
            sm.lrm = num
        elif key == "dt":
            sm.dt_ms = num * 1000.0 if value.strip().endswith("s") and not value.strip().endswith("ms") else num
        elif key == "tok/sec":
            sm.tok_per_sec = num
        elif key == "mfu":
            sm.mfu = num
        elif key == "epoch":
            sm.epoch = int(num) if math.isfinite(num) else None
        elif key == "remaining":
            sm.remaining = num
    return sm


def build_final(values: dict) -> FinalMetrics | None:
    """The `key: value` dict of a summary block -> FinalMetrics; None until the block has a line. A trainer that
    exported its model for the sealed evaluation prints no val_bpb line (val_bpb None)."""
    if not values:
        return None
    fm = FinalMetrics()
    if "val_bpb" in values:
        val = _number(values["val_bpb"])
        fm.val_bpb = float("nan") if val is None else val
    for key, raw in values.items():
        if key == "val_bpb":
            continue
        if key in _FLOAT_KEYS:
            setattr(fm, key, _number(raw))
        elif key in _INT_KEYS:
            num = _number(raw)
            setattr(fm, key, int(num) if num is not None and math.isfinite(num) else None)
        elif key in ("backend", "chip"):
            setattr(fm, key, raw)
        else:
            fm.extra[key] = raw
    return fm


# ---------------------------------------------------------------------------
# Incremental parser
# ---------------------------------------------------------------------------


@dataclass
class ParsedLine:
    text: str
    step: StepMetrics | None = None


class OutputParser:
    """Feed raw bytes (any chunking); get back complete lines with their parsed step, if any.

    State after feeding: .final (FinalMetrics once a `key: value` line was seen after `---`), .failed (a FAIL line),
    .backend / .device (from the `Backend: X (dev)` startup line), .last_step, .tail (recent non-step lines, for crash
    reports).
    """

    def __init__(self, tail_lines: int = TAIL_LINES):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._in_final = False
        self._final_values: dict = {}
        self.final: FinalMetrics | None = None
        self.failed = False
        self.backend: str | None = None
        self.device: str | None = None
        self.last_step: StepMetrics | None = None
        self.tail: deque = deque(maxlen=tail_lines)

    def feed(self, data: bytes) -> list[ParsedLine]:
        return self._split(self._decoder.decode(data, final=False))

    def finish(self) -> list[ParsedLine]:
        """End of stream: flush the decoder and any unterminated last line."""
        out = self._split(self._decoder.decode(b"", final=True))
        if self._pending.strip():
            out.append(self._line(self._pending))
        self._pending = ""
        return out

    def _split(self, text: str) -> list[ParsedLine]:
        if not text:
            return []
        buf = self._pending + text
        pieces = re.split(r"\r\n|\r|\n", buf)
        self._pending = pieces.pop()  # the unterminated remainder waits for more bytes
        if len(self._pending) > MAX_LINE_CHARS:
            pieces.append(self._pending)
            self._pending = ""
        return [self._line(p) for p in pieces if p.strip()]

    def _line(self, raw: str) -> ParsedLine:
        line = raw.rstrip()
        stripped = line.strip()
        step = parse_step(stripped)
        if step is not None:
            self.last_step = step
            return ParsedLine(line, step)
        self.tail.append(line)
        if stripped == FINAL_SEPARATOR:
            self._in_final = True
            self._final_values = {}
        elif self._in_final:
            m = FINAL_LINE_RE.match(stripped)
            if m:
                self._final_values[m.group(1)] = m.group(2)
                self.final = build_final(self._final_values)
        m = SEALED_RE.match(stripped)
        if m and self.final is not None:
            self.final.val_bpb = _number(m.group(1))
        if stripped == "FAIL" or stripped.startswith("FAIL "):
            self.failed = True
        m = BACKEND_RE.match(stripped)
        if m and self.backend is None:
            self.backend, self.device = m.group(1), m.group(2)
        return ParsedLine(line, None)


def parse_output(data: bytes) -> OutputParser:
    """Parse a whole log at once (e.g. runs/expN.log) and return the parser with its final state."""
    p = OutputParser()
    p.feed(data)
    p.finish()
    return p
