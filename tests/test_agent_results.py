"""results.tsv: escaping, header-driven reading, torn-write repair, atomic header, summaries."""

import os

from tui.results import COLUMNS, ResultsFile, Row, escape, rows_for_tag, summarize, unescape


def test_escaping_round_trip_keeps_rows_intact(tmp_path):
    rf = ResultsFile(tmp_path / "results.tsv")
    rf.ensure()
    nasty = "tab\there\nnewline \\n literal backslash\\ and \r CR"
    rf.append(Row.parse({"commit": "abc1234", "val_bpb": "1.000000", "status": "keep", "description": nasty, "exp": "exp0",
               "notes": "a\tb"}))
    rf.append(Row.parse({"commit": "def5678", "status": "crash", "description": "second", "exp": "exp1"}))
    text = (tmp_path / "results.tsv").read_text()
    assert len(text.splitlines()) == 3 and all(line.count("\t") == len(COLUMNS) - 1 for line in text.splitlines())
    rows = ResultsFile(tmp_path / "results.tsv").load()
    assert rows[0].description == nasty and rows[0].notes == "a\tb" and rows[1].description == "second"
    assert unescape(escape("\\t")) == "\\t"


def test_header_driven_reading_tolerates_extra_and_missing_columns(tmp_path):
    p = tmp_path / "results.tsv"
    # an upstream-style 5-column file, plus a row with a trailing extra field, plus a short row
    p.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                 "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
                 "b2c3d4e\t0.993200\t44.2\tkeep\tincrease LR\textra\n"
                 "c3d4e5f\t0.000000\n")
    rf = ResultsFile(p)
    rows = rf.load()
    assert [r.status for r in rows] == ["keep", "keep", ""]
    assert rows[1].description == "increase LR" and rows[2].description == ""
    rf.ensure()  # extends the header with our columns, keeps every row
    assert rf.header[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert set(COLUMNS) <= set(rf.header)
    rf.append(Row.parse({"commit": "d4e5f6a", "val_bpb": "0.99", "status": "discard", "exp": "exp3", "seed": "7"}))
    rows = ResultsFile(p).load()
    assert len(rows) == 4 and rows[0].description == "baseline" and rows[3].exp == 3
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_truncated_last_line_is_repaired_on_load(tmp_path):
    p = tmp_path / "results.tsv"
    rf = ResultsFile(p)
    rf.ensure()
    rf.append(Row.parse({"commit": "a", "status": "keep", "exp": "exp0", "val_bpb": "1.0"}))
    with open(p, "ab") as f:
        f.write(b"b\t0.9\t1.0\tke")  # power loss in the middle of a row
    size = p.stat().st_size
    assert len(ResultsFile(p).load()) == 1 and p.stat().st_size == size   # a reader ignores it, never truncates
    rf2 = ResultsFile(p)
    rows = rf2.load(repair=True)                                          # the owning agent cuts it off
    assert len(rows) == 1 and rf2.repaired and p.stat().st_size < size
    rf2.append(Row.parse({"commit": "c", "status": "discard", "exp": "exp1", "val_bpb": "1.1"}))
    rows = ResultsFile(p).load()
    assert [r.commit for r in rows] == ["a", "c"] and rows[1].status == "discard"


def test_summary_best_counts_next_and_tags():
    rows = [Row.parse(r) for r in [
        {"exp": "exp0", "status": "keep", "val_bpb": "1.05", "tag": "a"},
        {"exp": "exp1", "status": "keep", "val_bpb": "1.01", "tag": "a"},
        {"exp": "exp2", "status": "discard", "val_bpb": "0.90", "tag": "a"},  # lower but not kept: not the best
        {"exp": "exp3", "status": "crash", "val_bpb": "0.000000", "tag": "a"},
        {"exp": "exp4", "status": "skip", "tag": "a"},
        {"exp": "exp0", "status": "keep", "val_bpb": "0.5", "tag": "b"},
        {"exp": "7", "status": "keep", "val_bpb": "1.2"},  # no tag: belongs to every tag
    ]]
    s = summarize(rows_for_tag(rows, "a"))
    assert (s.runs, s.kept, s.discarded, s.crashed, s.skipped) == (5, 3, 1, 1, 1)
    assert (s.best_val_bpb, s.best_exp, s.next_exp) == (1.01, 1, 8)
    assert summarize([]).next_exp == 0 and summarize([]).best_val_bpb is None
