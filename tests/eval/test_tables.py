from phalanx.eval.stats import wilson_interval
from phalanx.eval.tables import accuracy_cell, accuracy_table, ci_margin, markdown_table, paired_eps_table, text_table


def _rec(model, attack, eps, acc, n=360, **extra):
    return {"model": model, "attack": attack, "eps": eps, "accuracy": acc, "n": n, "params": {}, **extra}


RECORDS = [
    _rec("member1", "clean", 0.0, 0.95, accuracy_std=0.004, repeats=10),
    _rec("member1", "fgsm", 0.1, 0.4),
    _rec("member1", "fgsm", 0.3, 0.0, warnings=["accuracy rose with eps"]),
    _rec("mixture", "clean", 0.0, 0.97),
    _rec("mixture", "fgsm", 0.1, 0.5, n=64),
    _rec("mixture", "fgsm", 0.3, 0.1),
]


def test_the_margin_is_the_larger_side_of_the_wilson_interval_rounded_up():
    lo, hi = wilson_interval(0, 360)  # [0, 1.056%]: the half-width (0.53) would understate the upper side
    assert ci_margin(_rec("m", "fgsm", 0.1, 0.0)) == 1.1 and 100 * hi <= 1.1
    lo, hi = wilson_interval(342, 360)  # 95%: [92.24, 96.81], larger side below the estimate
    assert ci_margin(_rec("m", "clean", 0.0, 0.95)) == 2.8 and 95 - 100 * lo <= 2.8
    assert ci_margin({"accuracy": 0.5}) is None  # no n: nothing to compute an interval from


def test_accuracy_table_says_n_per_row_and_each_cells_margin():
    header, rows = accuracy_table(RECORDS)
    assert header == ["model", "n", "clean", "fgsm 0.1", "fgsm 0.3"]
    assert rows[0] == ["member1", "360", "95.0 ±2.8 (sd 0.4)", "40.0 ±5.2", "0.0 ±1.1"]
    # a cell measured on another n than its row's says so
    assert rows[1] == ["mixture", "360", "97.0 ±2.4", "50.0 ±11.9 n=64", "10.0 ±3.6"]


def test_paired_eps_table_says_n_and_each_margin_with_warning_marks():
    header, rows = paired_eps_table(RECORDS)
    assert header == ["model", "n", "clean", "fgsm (0.1 / 0.3)"]
    assert rows == [["member1", "360", "95.0 ±2.8 (sd 0.4)", "40.0 ±5.2 / 0.0 ±1.1!"],
                    ["mixture", "360", "97.0 ±2.4", "50.0 ±11.9 n=64 / 10.0 ±3.6"]]


def test_records_without_ci95_or_n_still_render():
    old = [{"model": "m", "attack": "clean", "eps": 0.0, "accuracy": 0.5, "n": 100},  # before ci95 existed
           {"model": "m", "attack": "fgsm", "eps": 0.1, "accuracy": 0.25}]  # no n at all
    header, rows = accuracy_table(old)
    assert rows == [["m", "100", "50.0 ±9.7", "25.0 ±? n=?"]]
    assert accuracy_cell(old[0], n_shown=100) == "50.0 ±9.7"
    assert accuracy_table(old[1:])[1] == [["m", "?", "25.0 ±?"]]


def test_a_stored_interval_is_the_one_shown():
    rec = _rec("m", "clean", 0.0, 0.5, n=100, ci95=[0.3, 0.6])
    assert accuracy_cell(rec, n_shown=100) == "50.0 ±20.0"


def test_terminal_and_markdown_tables_stay_one_line_per_row():
    for table in (accuracy_table, paired_eps_table):
        header, rows = table(RECORDS)
        text = text_table(header, rows).splitlines()
        assert len(text) == 2 + len(rows) and len({len(line) for line in text}) == 1  # aligned
        md = markdown_table(header, rows).splitlines()
        assert len(md) == 2 + len(rows) and all(line.count("|") == len(header) + 1 for line in md)
