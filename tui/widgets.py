"""The dashboard's panels: training, hardware, loop status, experiments table, charts, activity log, detail view.

Each panel keeps its own small state and renders it; the mode screens (tui/modes.py) set it. Rendering depends only
on that state (no clocks, pids or paths unless given), so the layout snapshots are deterministic. What a panel shows
is computed by plain functions (status_lines, val_bpb_series, table_cells) that know nothing of Textual.
"""

import math
import time

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import DataTable, RichLog, Static
from textual_plotext import PlotextPlot

from tui.llm import Usage, format_cost
from tui.parser import FinalMetrics, StepMetrics
from tui.results import Row, Summary, group_experiments

MAX_CHART_POINTS = 1500  # the loss curve is thinned beyond this (a terminal has far fewer columns anyway)
LOG_LINES = 2000
DESCRIPTION_CHARS = 40
GIB = 1 << 30
MIB = 1 << 20

STATUS_STYLES = {"keep": "green", "discard": "red", "crash": "magenta", "skip": "dim"}
BASELINE_STYLE = "cyan"
LEVEL_STYLES = {"info": "", "warning": "yellow", "error": "bold red"}
# single-width symbols only: emoji widths differ between terminals and would break the borders
TIMED_STATES = ("thinking", "waiting")  # the status line says how long these have lasted
STATE_ICONS = {
    "idle": ("◯", "dim"), "initializing": ("⟳", "cyan"), "baseline": ("▶", "cyan"),
    "thinking": ("◐", "yellow"), "waiting": ("⧗", "yellow"), "committing": ("✎", "white"),
    "training": ("▶", "green"), "evaluating": ("◆", "magenta"), "paused": ("‖", "yellow"),
    "stopping": ("■", "red"), "stopped": ("■", "red"), "failed": ("✗", "bold red"), "watching": ("◉", "cyan"),
}

# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def fmt_duration(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    if n >= 100 * GIB:
        return f"{n / GIB:.0f} GB"
    if n >= GIB:
        return f"{n / GIB:.1f} GB"
    return f"{n / MIB:.0f} MB"


def fmt_num(x, spec: str = ",.0f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def fmt_flops(flops) -> str:
    if not flops:
        return "-"
    for scale, unit in ((1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s")):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops:.3g} FLOP/s"


def bar(fraction: float, width: int, style: str = "green") -> Text:
    fraction = min(1.0, max(0.0, fraction))
    filled = int(round(fraction * width))
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


def line(*parts, style: str = "") -> Text:
    """One panel line that never wraps (a long value ends in an ellipsis instead of pushing the border)."""
    t = Text.assemble(*parts, style=style, no_wrap=True, overflow="ellipsis")
    return t


def fit(width: int, *candidates: str) -> str:
    """The first (most detailed) candidate that fits in width cells, else the last one."""
    return next((c for c in candidates if len(c) <= width), candidates[-1])


def pairs_grid(rows) -> Table:
    """label value  label value rows; labels dim. Cells never wrap."""
    grid = Table.grid(padding=(0, 1))
    for i in range(4):
        grid.add_column(style="dim" if i % 2 == 0 else "", no_wrap=True, overflow="ellipsis",
                        min_width=None if i % 2 == 0 else 10)
    for row in rows:
        grid.add_row(*[c if isinstance(c, Text) else Text(str(c)) for c in row])
    return grid


def status_style(row: Row) -> str:
    if row.exp == 0 and row.status == "keep":
        return BASELINE_STYLE
    return STATUS_STYLES.get(row.status, "")


# ---------------------------------------------------------------------------
# Training panel
# ---------------------------------------------------------------------------


COMPILING_BACKENDS = ("cuda", "mlx")  # train.py compiles on CUDA only (torch.compile), train_mlx.py always


def starting_note(backend: str | None, hardware: dict | None = None) -> str:
    """What the training panel says before the first step: compiling only where the trainer compiles (a CPU or MPS
    run does not), a plain wait where nothing says which backend it is."""
    kind = (hardware or {}).get("kind")
    if backend in COMPILING_BACKENDS or (backend is None and kind in ("nvidia", "amd")):
        return "Starting… (the first step can take a while: compiling)"
    if backend is None and kind is None:
        return "Starting… (the first step can take a while)"
    return "Starting…"


class TrainingPanel(Widget):
    """The current run: progress while it trains, the summary block once it is done."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.title = ""
        self.note = "Waiting for training…"
        self.last: StepMetrics | None = None
        self.final: FinalMetrics | None = None
        self.backend: str | None = None
        self.verdict: tuple | None = None  # (text, style) once the run is judged / ended
        self.running = False

    def start(self, title: str, note: str = starting_note(None)) -> None:
        self.title, self.note = title, note
        self.last, self.final, self.verdict, self.backend = None, None, None, None
        self.running = True
        self.refresh()

    def wait(self, note: str, title: str = "") -> None:
        """Nothing is training (e.g. the LLM is thinking): keep the last result, say what happens."""
        self.note = note
        if title:
            self.title = title
        self.refresh()

    def set_backend(self, backend: str | None) -> None:
        if backend and backend != self.backend:
            self.backend = backend
            self.refresh()

    def step(self, sm: StepMetrics) -> None:
        self.last = sm
        self.running = True
        self.refresh()

    def finish(self, final: FinalMetrics | None, verdict: str | None = None, style: str = "",
               note: str | None = None) -> None:
        self.final = final or self.final
        self.running = False
        if verdict:
            self.verdict = (verdict, style)
        if note:
            self.note = note
        self.refresh()

    def render(self):
        width = max(20, self.size.width)
        parts = []
        if self.title or self.verdict:
            verdict = ("  ", (self.verdict[0], f"bold {self.verdict[1]}")) if self.verdict else ()
            parts.append(line((self.title or "training", "bold cyan"), *verdict))
        f, s = self.final, self.last
        if f is None and s is None:
            parts.append(line((self.note, "dim")))
            return Group(*parts)
        pct = 100.0 if f is not None else s.pct_done
        if f is None and not self.running:  # stopped or crashed before the summary: say why instead of a bar
            style = self.verdict[1] if self.verdict else "dim"
            parts.append(line((self.note or f"ended at {pct:.1f}% without a summary", style)))
        else:
            tail = f" {pct:5.1f}%"
            if f is None and s.remaining is not None:
                tail += f"  ETA {fmt_duration(s.remaining)}"
            bar_width = max(8, width - len(tail))
            parts.append(Text.assemble(bar(pct / 100.0, bar_width, "green" if f is not None else "cyan"), tail,
                                       no_wrap=True, overflow="crop"))
        if f is not None:
            val = (Text("sealed evaluation…", style="dim") if f.val_bpb is None  # the engine scores the export
                   else Text(f"{f.val_bpb:.6f}", style="bold green" if f.ok else "bold red"))
            time_text = f"{fmt_duration(f.training_seconds)} / {fmt_duration(f.total_seconds)}"
            params = "-" if f.num_params_M is None else f"{f.num_params_M:.1f}M"
            rows = [
                ("val_bpb", val, "peak mem", "-" if f.peak_vram_mb is None else fmt_bytes(f.peak_vram_mb * MIB)),
                ("steps", fmt_num(f.num_steps, ",d") if f.num_steps is not None else "-", "tokens",
                 "-" if f.total_tokens_M is None else f"{f.total_tokens_M:,.1f}M"),
                ("time", time_text, "MFU", "-" if f.mfu_percent is None else f"{f.mfu_percent:.2f}%"),
                ("params", params + ("" if f.depth is None else f" · depth {f.depth}"), "backend",
                 f.backend or self.backend or "-"),
            ]
        else:
            rows = [
                ("step", f"{s.step:05d}", "loss", "-" if s.loss is None else f"{s.loss:.4f}"),
                ("tok/s", fmt_num(s.tok_per_sec), "lrm", "-" if s.lrm is None else f"{s.lrm:.2f}"),
                ("MFU", "-" if s.mfu is None else f"{s.mfu:.1f}%", "epoch", fmt_num(s.epoch, "d")),
                ("dt", "-" if s.dt_ms is None else f"{s.dt_ms:.0f} ms", "backend", self.backend or "detecting…"),
            ]
        parts.append(pairs_grid(rows))
        return Group(*parts)


# ---------------------------------------------------------------------------
# Hardware panel
# ---------------------------------------------------------------------------


class HardwarePanel(Widget):
    """Chip, memory (system/unified, the trainer's process tree, GPU) and the peak used for MFU."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hw: dict | None = None
        self.chip: str | None = None  # from the trainer's "Chip: ..." line
        self.mfu_peak: float | None = None  # FLOP/s the trainer divides by for MFU
        self.mem = None  # tui.sysmem.MemorySample

    def set_hardware(self, hw: dict | None) -> None:
        if hw:
            self.hw = dict(hw)
            self.refresh()

    def set_trainer_chip(self, chip: str, peak_flops: float | None) -> None:
        self.chip, self.mfu_peak = chip or self.chip, peak_flops or self.mfu_peak
        self.refresh()

    def set_memory(self, sample) -> None:
        self.mem = sample
        self.refresh()

    def render(self):
        hw, mem = self.hw or {}, self.mem
        width = max(10, self.size.width)
        chip = self.chip or hw.get("chip_name") or "detecting hardware…"
        lines = [line((chip, "bold"))]
        detail = []
        if hw.get("gpu_cores"):
            detail.append(f"{hw['gpu_cores']} GPU cores")
        elif hw.get("sm_count"):
            detail.append(f"{hw['sm_count']} {'CUs' if hw.get('kind') == 'amd' else 'SMs'}")
        elif hw.get("cpu_cores"):
            detail.append(f"{hw['cpu_cores']} cores")
        total_gb = hw.get("memory_gb") or (mem.system_total / GIB if mem else None)
        if total_gb:
            kind = hw.get("memory_kind") or "system"
            detail.append(f"{total_gb:.0f} GB {kind}" if total_gb >= 100 else f"{total_gb:.1f} GB {kind}")
        if detail:
            lines.append(line(" · ".join(detail)))
        if mem is not None:
            frac = mem.system_used / mem.system_total if mem.system_total else 0.0
            style = "red" if frac > 0.9 else "yellow" if frac > 0.75 else "green"
            label = "unified" if hw.get("memory_kind") == "unified" else "used"
            numbers = f" {mem.system_used / GIB:.1f}/{mem.system_total / GIB:.1f} GB"
            bar_width = max(4, min(20, width - len(label) - len(numbers) - 1))
            lines.append(line((label + " ", "dim"), bar(frac, bar_width, style), numbers))
            if mem.trainer is not None:
                procs = f" in {mem.trainer_procs} procs" if mem.trainer_procs > 1 else ""
                peak = f" · peak {fmt_bytes(mem.trainer_peak)}" if mem.trainer_peak and \
                    mem.trainer_peak - mem.trainer > 100 * MIB else ""
                now = fmt_bytes(mem.trainer)
                text = fit(width - len("trainer "), now + procs + peak, now + peak, now + procs, now)
                lines.append(line(("trainer ", "dim"), text))
            else:
                lines.append(line(("trainer ", "dim"), ("not running", "dim")))
            for gpu in mem.gpus[:2]:
                mine = f" · trainer {fmt_bytes(mem.trainer_gpu)}" if mem.trainer_gpu else ""
                lines.append(line(("GPU ", "dim"), f"{gpu.used / GIB:.1f}/{gpu.total / GIB:.0f} GB", mine))
        peak = self.mfu_peak or hw.get("peak_flops")
        if peak:
            dtype = hw.get("peak_flops_dtype") or ""
            lines.append(line(("MFU peak ", "dim"), fmt_flops(peak), f" {dtype}" if dtype else ""))
        return Group(*lines)


# ---------------------------------------------------------------------------
# Loop status panel
# ---------------------------------------------------------------------------


def status_lines(state: str, message: str, pause_pending: bool, summary: Summary | None, usage: Usage,
                 extra: dict, elapsed: float | None = None) -> list[Text]:
    """The loop status panel's lines: the state (with how long it has lasted, while the LLM thinks: a call of
    minutes must not look like a hang); the tag's totals and best; the keep rule's figures and LLM usage."""
    icon, style = STATE_ICONS.get(state, ("•", ""))
    pausing = ("pausing after this experiment · ", "bold yellow") if pause_pending and \
        state not in ("paused", "stopped", "failed") else ""
    since = (f" · {fmt_duration(elapsed)}", "dim") if elapsed is not None and state in TIMED_STATES else ""
    lines = [line((f"{icon} {state.upper()}", f"bold {style}"), "  ", pausing, message, since)]
    if summary is None:
        return lines
    best = "-" if summary.best_val_bpb is None else f"{summary.best_val_bpb:.6f}"
    if summary.best_exp is not None:
        best += f" (exp{summary.best_exp})"
    t = Text.assemble(("runs ", "dim"), str(summary.runs), ("  kept ", "dim"), (str(summary.kept), "green"),
                      ("  discarded ", "dim"), (str(summary.discarded), "red"))
    if summary.crashed:  # zero counts are left out so the line fits 80 columns
        t.append_text(Text.assemble(("  crashed ", "dim"), (str(summary.crashed), "magenta")))
    if summary.skipped:
        t.append_text(Text.assemble(("  skipped ", "dim"), str(summary.skipped)))
    t.append_text(Text.assemble(("  best ", "dim"), (best, "bold green")))
    lines.append(t)
    u = Text()  # the keep rule's figures, then the LLM's bill
    for key, value in extra.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        u.append_text(Text.assemble((f"{key} ", "dim"), shown, "  "))
    if usage.calls or usage.tokens or usage.failed:
        u.append_text(Text.assemble(("LLM ", "dim"), f"{usage.tokens:,} tokens", ("  cost ", "dim"),
                                    format_cost(usage.cost_usd)))
        if usage.failed:
            u.append_text(Text.assemble(("  failed calls ", "dim"), (str(usage.failed), "yellow")))
    elif state != "watching":
        u.append("LLM no calls yet", style="dim")
    u.rstrip()
    if u.plain:
        lines.append(u)
    return lines


class StatusPanel(Vertical):
    """The agent's state, the tag's totals, best result and noise margin, LLM usage (status_lines).

    One Static per line, hidden while it has nothing to say, so that the panel's auto height follows its content.
    (Textual keeps a widget's cached size until a refresh(layout=True) that finds no layout pending: a single widget
    re-rendering to another height while one is pending, with a screen layout in between, would keep the old height.
    A child shown or hidden is always counted.)"""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.state = "idle"
        self.message = ""
        self.summary: Summary | None = None  # the tag's totals
        self.usage = Usage()  # LLM calls, tokens and cost
        self.extra: dict = {}  # the keep rule's figures (noise floor, margin, plateau)
        self.pause_pending = False
        self.context = ""  # shown on the bottom border, e.g. "max 100 · scope hparams"
        self.since = time.monotonic()  # when the state began (TIMED_STATES show how long ago)

    def compose(self) -> ComposeResult:
        for _ in range(3):
            yield Static()

    def on_mount(self) -> None:
        self.show()
        self.set_interval(1.0, self._tick)

    def _tick(self) -> None:
        if self.state in TIMED_STATES:
            self.show()

    def set_state(self, state: str, message: str = "") -> None:
        if state != self.state:
            self.since = time.monotonic()
        self.state, self.message = state, message
        self.border_subtitle = self.context
        self.show()

    def set_totals(self, summary: Summary, usage: Usage, extra: dict) -> None:
        self.summary, self.usage, self.extra = summary, usage, extra
        self.show()

    def set_pause_pending(self, pending: bool) -> None:
        self.pause_pending = pending
        self.show()

    def show(self) -> None:
        lines = status_lines(self.state, self.message, self.pause_pending, self.summary, self.usage, self.extra,
                             time.monotonic() - self.since)
        for i, static in enumerate(self.query_children(Static)):
            static.display = i < len(lines)
            if i < len(lines):
                static.update(lines[i])


def slot_lines(views: list, selected: int) -> list:
    """One line per slot (tui.events.SlotView): which experiment, how far, how fast, on which worker."""
    lines = []
    for v in views:
        mark = "▸" if v.slot == selected else " "
        if v.exp is None:
            lines.append(Text.assemble(f"{mark} {v.worker:<16} ", ("idle", "dim")))
            continue
        label = f"exp{v.exp}" + (f" r{v.run}" if v.run else "")
        tok = f"{v.tok_per_sec:,.0f} tok/s" if v.tok_per_sec else "- tok/s"
        lines.append(Text.assemble(f"{mark} {v.worker:<16} ", (f"{label:<9}", "bold cyan"), f"{v.pct:5.1f}%  ",
                                   f"{tok:>14}  ", (v.description, "dim")))
    return lines


class SlotsPanel(Static):
    """The slots of --workers N > 1, the selected one marked (n selects the next; s stops its run). Hidden with a
    single slot."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.views: list = []
        self.selected = 1

    def set_slots(self, views: list, selected: int) -> None:
        self.views, self.selected = list(views), selected
        self.display = len(self.views) > 1
        self.update(Text("\n").join(slot_lines(self.views, selected)))


# ---------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------


def int_ticks(lo: float, hi: float, n: int = 5) -> list:
    """Up to n whole-number ticks from lo to hi (steps and experiment numbers are integers)."""
    lo, hi = int(math.floor(lo)), int(math.ceil(hi))
    if hi <= lo:
        return [lo]
    step = max(1, math.ceil((hi - lo) / max(1, n - 1)))
    return list(range(lo, hi + 1, step))


class LossChart(PlotextPlot):
    """Training loss of the current run, live."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps: list = []
        self.losses: list = []
        self.label = ""

    def on_mount(self) -> None:
        super().on_mount()
        self.replot()

    def reset(self, label: str = "") -> None:
        self.steps, self.losses, self.label = [], [], label
        self.replot()

    def add(self, step: int, loss: float | None) -> None:
        if loss is None or not math.isfinite(loss):
            return
        if self.steps and step <= self.steps[-1]:  # a restarted log: start over
            self.steps, self.losses = [], []
        self.steps.append(step)
        self.losses.append(loss)
        self.replot()

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        self.border_title = "Training loss" + (f" · {self.label}" if self.label else "")
        self.border_subtitle = (f"step {self.steps[-1]} · loss {self.losses[-1]:.4f}" if self.losses else
                                "waiting for training steps")
        if self.losses:
            k = max(1, math.ceil(len(self.losses) / MAX_CHART_POINTS))
            plt.plot(self.steps[::k], self.losses[::k], marker="braille", color="cyan")
            plt.xticks(int_ticks(self.steps[0], self.steps[-1]))
        else:
            plt.xticks([])
            plt.yticks([])
        self.refresh()


def val_bpb_series(rows: list[Row]):
    """upstream's progress chart as (kept [(exp, val)], discarded [(exp, val)], the running best as a step line
    [(exp, val)]). An experiment with several runs (confirmation or noise-floor runs) is one point: the mean of its
    scored runs; its first row's status says whether it was kept."""
    kept, disc, best_line, best = [], [], [], None
    experiments = [e for e in group_experiments(rows) if e.exp is not None and e.mean is not None]
    for e in sorted(experiments, key=lambda e: e.exp):
        if e.status not in ("keep", "discard"):
            continue
        n, val = e.exp, e.mean
        (kept if e.status == "keep" else disc).append((n, val))
        if e.status == "keep" and (best is None or val < best):
            if best is not None:
                best_line.append((n, best))  # the step down happens at this experiment
            best = val
            best_line.append((n, best))
    if best_line and (kept or disc):
        last = max(x for x, _ in kept + disc)
        if last > best_line[-1][0]:
            best_line.append((last, best))
    return kept, disc, best_line


class BpbChart(PlotextPlot):
    """val_bpb per experiment (kept and discarded) with the running best."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.series = ([], [], [])  # val_bpb_series of the rows shown

    def on_mount(self) -> None:
        super().on_mount()
        self.replot()

    def set_rows(self, rows: list[Row]) -> None:
        self.series = val_bpb_series(rows)
        self.replot()

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        kept, disc, best_line = self.series
        self.border_title = "val_bpb per experiment"
        best = min(kept, key=lambda p: p[1]) if kept else None
        self.border_subtitle = (f"best {best[1]:.6f} (exp{best[0]}) · ● kept x discarded" if best else
                                "no results yet")
        if not (kept or disc):
            plt.xticks([])
            plt.yticks([])
            self.refresh()
            return
        if len(best_line) > 1:
            plt.plot([x for x, _ in best_line], [y for _, y in best_line], color="green", marker="braille")
        if disc:
            plt.scatter([x for x, _ in disc], [y for _, y in disc], color="red", marker="x")
        if kept:
            plt.scatter([x for x, _ in kept], [y for _, y in kept], color="green", marker="●")
        xs = [x for x, _ in kept + disc]
        plt.xticks(int_ticks(min(xs), max(xs)))
        self.refresh()


# ---------------------------------------------------------------------------
# Experiments table
# ---------------------------------------------------------------------------


class ExperimentsTable(DataTable):
    """results.tsv, newest first, coloured by status. Row keys are the row's index in the file."""

    COLUMNS = ("Exp", "Status", "val_bpb", "Description", "Mem GB", "tok/s", "MFU %", "Steps", "Time")
    BINDINGS = [Binding("enter", "select_cursor", "Diff")]

    def __init__(self, **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.rows_by_key: dict = {}

    def on_mount(self) -> None:
        for name in self.COLUMNS:
            self.add_column(name, key=name)

    def load(self, rows: list[Row]) -> None:
        selected = None
        if self.row_count:
            try:
                selected = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
            except Exception:
                selected = None
        self.clear()
        self.rows_by_key = {}
        for i in range(len(rows) - 1, -1, -1):
            r = rows[i]
            key = str(i)
            self.rows_by_key[key] = r
            texts = [Text(c, style=status_style(r)) for c in table_cells(r)]
            if r.status == "keep":
                texts[2].stylize("bold")
            self.add_row(*texts, key=key)
        if selected in self.rows_by_key:
            self.move_cursor(row=self.get_row_index(selected), animate=False)

    def selected_row(self) -> Row | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:
            return None
        return self.rows_by_key.get(key)


def table_cells(r: Row) -> list[str]:
    """One results row as the table's columns (ExperimentsTable.COLUMNS); unknown figures stay blank."""
    desc = " ".join(r.description.split())
    if len(desc) > DESCRIPTION_CHARS:
        desc = desc[:DESCRIPTION_CHARS - 1] + "…"
    blank = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
    return [r.label, r.status, f"{r.val_bpb:.6f}" if r.scored else "-", desc,
            f"{r.memory_gb:.1f}" if r.memory_gb else "", blank(r.tok_sec, ","), blank(r.mfu, ".2f"),
            blank(r.steps, "d"), "" if r.seconds is None else fmt_duration(r.seconds)]


# ---------------------------------------------------------------------------
# Activity log
# ---------------------------------------------------------------------------


class ActivityLog(RichLog):
    """Timestamped events. `clock` makes the timestamps deterministic in snapshots."""

    def __init__(self, clock=None, **kwargs):
        super().__init__(wrap=True, markup=False, highlight=False, max_lines=LOG_LINES, min_width=1, **kwargs)
        self.clock = clock or (lambda: time.strftime("%H:%M:%S"))
        self.history: list = []  # plain text of what was written, newest last (bounded like the widget)

    def add(self, message: str, style: str = "") -> None:
        for i, text in enumerate(str(message).splitlines() or [""]):
            stamp = f"{self.clock()} " if i == 0 else " " * (len(self.clock()) + 1)
            self.write(Text.assemble((stamp, "dim"), (text, style)))
            self.history.append(stamp + text)
        del self.history[:-LOG_LINES]


# ---------------------------------------------------------------------------
# Detail view: one experiment's diff and log tail
# ---------------------------------------------------------------------------


def diff_text(diff: str) -> Text:
    out = Text(no_wrap=True, overflow="crop")
    for ln in diff.splitlines():
        if ln.startswith("+++") or ln.startswith("---"):
            style = "bold"
        elif ln.startswith("+"):
            style = "green"
        elif ln.startswith("-"):
            style = "red"
        elif ln.startswith("@@"):
            style = "cyan"
        else:
            style = ""
        out.append(ln + "\n", style=style)
    return out


class DetailScreen(ModalScreen):
    """A modal with what an experiment changed, how its training ended and, for an experiment that asked the LLM,
    every call's reply (runs/expN.llm.jsonl: a skipped row shows why it was skipped)."""

    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("q", "dismiss", "Close"),
                Binding("enter", "dismiss", "Close", show=False)]

    def __init__(self, title: str, diff: str, log: str, log_name: str = "log", llm: str | None = None):
        super().__init__()
        self.title_text, self.diff_body, self.log_body, self.log_name = title, diff, log, log_name
        self.llm_body = llm

    def compose(self) -> ComposeResult:
        with Vertical(id="detail"):
            with VerticalScroll(id="detail-scroll"):
                yield Static(Text("diff", style="bold underline"))
                yield Static(diff_text(self.diff_body or "(empty)"), id="detail-diff")
                yield Static(Text(f"\n{self.log_name} (tail)", style="bold underline"))
                yield Static(Text(self.log_body or "(no log)", no_wrap=True, overflow="crop"), id="detail-log")
                if self.llm_body is not None:
                    yield Static(Text("\nLLM calls", style="bold underline"))
                    yield Static(Text(self.llm_body or "(none)", overflow="fold"), id="detail-llm")
            yield Static(Text("esc / q / enter: close · arrows: scroll", style="dim"), id="detail-help")

    def on_mount(self) -> None:
        self.query_one("#detail").border_title = self.title_text
        self.query_one("#detail-scroll").focus()
