"""Trainer output protocol parser: progress lines, the --- summary, chunking and UTF-8 split across reads."""

import math

import pytest

from tui.parser import OutputParser, parse_output, parse_step

STEP = ("step 00042 (14.0%) | loss: 3.456789 | lrm: 1.00 | dt: 512ms | tok/sec: 4,000 | mfu: 51.2% | epoch: 1 | "
        "remaining: 258s")
SUMMARY = """---
val_bpb:          0.997900
training_seconds: 300.1
total_seconds:    325.9
peak_vram_mb:     45060.2
mfu_percent:      39.80
total_tokens_M:   499.6
num_steps:        953
num_params_M:     50.3
depth:            8
backend:          mlx
chip:             Apple M4 Max
"""


def feed_all(parser, data: bytes, chunk: int):
    lines = []
    for i in range(0, len(data), chunk):
        lines += parser.feed(data[i:i + chunk])
    return lines + parser.finish()


def test_step_line_contract():
    s = parse_step(STEP)
    assert (s.step, s.pct_done, s.loss, s.lrm, s.dt_ms, s.tok_per_sec, s.mfu, s.epoch, s.remaining) == \
        (42, 14.0, 3.456789, 1.0, 512.0, 4000.0, 51.2, 1, 258.0)


def test_step_line_with_a_changed_field_keeps_the_others():
    s = parse_step("step 00007 (1.5%) | loss: 2.5 | lrm: n/a | dt: 1.2s | tok/sec: 12,345,678 | new: 3 | epoch: 2")
    assert (s.step, s.loss, s.lrm, s.dt_ms, s.tok_per_sec, s.epoch, s.mfu) == \
        (7, 2.5, None, 1200.0, 12345678.0, 2, None)
    assert parse_step("stepping up the loss: 3") is None


def test_summary_complete_without_chip_line():
    # upstream's train.py prints no chip: line; the seed scored such runs as crashes
    text = SUMMARY.replace("chip:             Apple M4 Max\n", "").replace("backend:          mlx\n", "")
    p = parse_output(("Backend: mlx (gpu)\n" + STEP + "\n" + text).encode())
    f = p.final
    assert f is not None and f.ok
    assert (f.val_bpb, f.training_seconds, f.peak_vram_mb, f.num_steps, f.depth, f.chip) == \
        (0.9979, 300.1, 45060.2, 953, 8, None)
    assert (p.backend, p.device) == ("mlx", "gpu")


def test_summary_fields_and_unknown_keys():
    p = parse_output((SUMMARY + "avg_watts:        41.5\n").encode())
    assert p.final.chip == "Apple M4 Max" and p.final.backend == "mlx"
    assert p.final.mfu_percent == 39.8 and p.final.total_tokens_M == 499.6 and p.final.num_params_M == 50.3
    assert p.final.extra == {"avg_watts": "41.5"}


def test_key_value_lines_before_the_separator_are_not_a_summary():
    p = parse_output(b"val_bpb:          0.5\nconfig: something\n")
    assert p.final is None


def test_carriage_return_progress_and_split_crlf():
    data = ("\r" + STEP + "\r" + STEP.replace("00042", "00043") + "\r\nplain line\r\n" + SUMMARY).encode()
    for chunk in (1, 2, 3, 7, 64, len(data)):
        p = OutputParser()
        lines = feed_all(p, data, chunk)
        steps = [pl.step.step for pl in lines if pl.step]
        texts = [pl.text for pl in lines if not pl.step]
        assert steps == [42, 43], chunk
        assert texts[0] == "plain line" and "" not in texts, chunk
        assert p.final.val_bpb == 0.9979, chunk


def test_multibyte_utf8_split_across_reads():
    text = "données — 你好 ✓ 🚀 naïve\n"
    data = ("Backend: cpu (cpu)\n" + text + "\r" + STEP + "\n").encode("utf-8")
    for chunk in (1, 2, 3, 5):
        p = OutputParser()
        lines = feed_all(p, data, chunk)
        assert [pl.text for pl in lines if not pl.step] == ["Backend: cpu (cpu)", text.strip()], chunk


def test_garbled_bytes_do_not_break_parsing():
    data = b"\xff\xfe broken \xc3\n" + ("\r" + STEP + "\n").encode() + b"\x00junk\n" + SUMMARY.encode()
    p = OutputParser()
    lines = feed_all(p, data, 4)
    assert "\ufffd" in lines[0].text
    assert lines[1].step.step == 42
    assert p.final.val_bpb == 0.9979


def test_unterminated_last_line_is_flushed_at_the_end():
    p = OutputParser()
    first = p.feed(b"Traceback (most recent call last):\nValueError: bo")
    assert [pl.text for pl in first] == ["Traceback (most recent call last):"]  # the rest waits for more bytes
    assert [pl.text for pl in p.finish()] == ["ValueError: bo"]
    assert list(p.tail)[-2:] == ["Traceback (most recent call last):", "ValueError: bo"]


def test_fail_and_nan():
    p = parse_output(("\r" + STEP.replace("3.456789", "nan") + "\nFAIL\n").encode())
    assert p.failed and p.final is None and math.isnan(p.last_step.loss)
    p = parse_output(b"---\nval_bpb:          nan\nnum_steps: 3\n")
    assert p.final is not None and not p.final.ok


def test_tail_keeps_recent_non_step_lines():
    lines = "".join(f"line {i}\n\r{STEP}\n" for i in range(100))
    p = parse_output(lines.encode())
    assert list(p.tail)[-1] == "line 99" and len(p.tail) == 60 and all("step" not in t for t in p.tail)


def test_endless_line_without_terminator_is_cut_not_hoarded():
    from tui.parser import MAX_LINE_CHARS
    p = OutputParser()
    lines = []
    for _ in range(3):
        lines += p.feed(b"x" * (MAX_LINE_CHARS // 2 + 1))
    assert lines and len(p._pending) <= MAX_LINE_CHARS

# ---------------------------------------------------------------------------
# The writer: prepare.print_summary, which both trainers call
# ---------------------------------------------------------------------------

RAW_FIELDS = dict(val_bpb=0.99789987, training_seconds=300.0871, total_seconds=325.94, peak_vram_mb=45060.18,
                  mfu_percent=39.7961, total_tokens_M=499.6123, num_steps=953, num_params_M=50.3333, depth=8,
                  backend="mlx", chip="Apple M4 Max")


def test_print_summary_writes_the_protocol_block(capsys):
    import prepare
    prepare.print_summary(**RAW_FIELDS)
    assert capsys.readouterr().out == SUMMARY


def test_print_summary_round_trips_through_the_parser(capsys):
    import prepare
    prepare.print_summary(**dict(reversed(RAW_FIELDS.items())), avg_watts=41.5, a_rather_long_extra_key=3)
    out = capsys.readouterr().out
    f = parse_output(("Training complete. Evaluating...\n" + out).encode()).final
    assert f is not None and f.ok
    assert (f.val_bpb, f.training_seconds, f.total_seconds, f.peak_vram_mb, f.mfu_percent, f.total_tokens_M,
            f.num_steps, f.num_params_M, f.depth, f.backend, f.chip) == \
        (0.9979, 300.1, 325.9, 45060.2, 39.8, 499.6, 953, 50.3, 8, "mlx", "Apple M4 Max")
    assert f.extra == {"avg_watts": "41.5", "a_rather_long_extra_key": "3"}  # after the fixed keys, as given
    assert out.startswith(SUMMARY)


def test_print_summary_refuses_an_incomplete_block(capsys):
    import prepare
    fields = {k: v for k, v in RAW_FIELDS.items() if k != "depth"}
    with pytest.raises(TypeError, match="missing depth"):
        prepare.print_summary(**fields)
    assert capsys.readouterr().out == ""  # nothing half-written for the parser to take as a result


def test_a_summary_without_val_bpb_is_a_summary_and_the_sealed_line_completes_it():
    p = parse_output(b"---\ntraining_seconds: 2.0\nnum_steps: 3\n")
    assert p.final is not None and p.final.val_bpb is None and not p.final.ok and p.final.num_steps == 3
    p = parse_output(b"---\nnum_steps: 3\n\nsealed evaluation: val_bpb 1.234567 on 4,096 tokens in 9.1s\n")
    assert p.final.val_bpb == 1.234567 and p.final.ok


def test_print_summary_leaves_val_bpb_out_for_an_exported_model(capsys):
    import prepare
    prepare.print_summary(**{**RAW_FIELDS, "val_bpb": None})
    out = capsys.readouterr().out
    assert "val_bpb" not in out and parse_output(out.encode()).final.num_steps == 953
