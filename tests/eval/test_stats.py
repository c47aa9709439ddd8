import math

import pytest

from phalanx.eval.stats import add_ci95, record_ci95, wilson_interval

# Wilson score intervals (z = 1.959964) worked out from the formula independently of the code:
# (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n); 0/10 has upper bound z²/(n + z²) = 3.8415/13.8415.
# The same numbers come out of scipy.stats.binomtest(k, n).proportion_ci(method="wilson").
HAND = [
    (0, 10, 0.0, 0.2775328),
    (10, 10, 0.7224672, 1.0),
    (50, 100, 0.4038315, 0.5961685),
    (3, 7, 0.1582199, 0.7495416),
    (81, 100, 0.7222115, 0.8748525),
    (1, 360, 0.0004905, 0.0155644),
]


@pytest.mark.parametrize("correct, n, lo, hi", HAND)
def test_wilson_matches_values_worked_out_by_hand(correct, n, lo, hi):
    assert wilson_interval(correct, n) == pytest.approx((lo, hi), abs=1e-6)


@pytest.mark.parametrize("correct, n", [(k, n) for k, n, _, _ in HAND] + [(0, 1), (1, 1), (7, 10000)])
def test_wilson_matches_scipy(correct, n):
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(correct, n) == pytest.approx((ci.low, ci.high), abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 64, 360, 1000])
def test_bounds_lie_in_the_unit_interval_and_contain_the_estimate(n):
    for correct in range(0, n + 1, max(1, n // 37)):
        lo, hi = wilson_interval(correct, n)
        assert 0.0 <= lo <= correct / n <= hi <= 1.0
        assert lo < hi
    assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0  # exactly, not 1e-17 off


def test_the_interval_shrinks_as_n_grows():
    widths = [hi - lo for lo, hi in (wilson_interval(n // 4, n) for n in (8, 40, 400, 4000, 40000))]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    # roughly 1/sqrt(n): 100 times the examples, a tenth of the width
    assert widths[2] / widths[4] == pytest.approx(10, rel=0.05)


def test_a_wider_z_gives_a_wider_interval_and_n_zero_measures_nothing():
    lo95, hi95 = wilson_interval(30, 100)
    lo99, hi99 = wilson_interval(30, 100, z=2.5758)
    assert lo99 < lo95 and hi99 > hi95
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("correct, n, z, message", [
    (1, -1, 1.96, "n must be an integer >= 0, got -1"),
    (11, 10, 1.96, r"correct must be an integer in \[0, n=10\], got 11"),
    (-1, 10, 1.96, "got -1"),
    (0.5, 10, 1.96, "got 0.5"),
    (1, 10, 0.0, "z must be a finite number > 0"),
    (1, 10, math.nan, "z must be a finite number > 0"),
])
def test_bad_arguments_are_refused(correct, n, z, message):
    with pytest.raises(ValueError, match=message):
        wilson_interval(correct, n, z=z)


def test_add_ci95_uses_the_rounded_count_of_correct_examples():
    records = [{"model": "m", "attack": "clean", "accuracy": 0.5, "n": 100},
               {"model": "m", "attack": "fgsm", "accuracy": 1 / 3, "n": 3},  # 0.333... * 3 rounds to 1
               {"model": "m", "attack": "strongest", "accuracy": 0.0, "n": 0},
               {"model": "m", "attack": "pgd", "accuracy": 0.25, "n": 8, "ci95": [0.0, 0.01]}]  # replaced
    add_ci95(records)
    assert records[0]["ci95"] == pytest.approx([0.4038315, 0.5961685], abs=1e-6)
    assert records[1]["ci95"] == list(wilson_interval(1, 3))
    assert records[2]["ci95"] == [0.0, 1.0]
    assert records[3]["ci95"] == list(wilson_interval(2, 8))
    assert all(isinstance(r["ci95"], list) for r in records)  # JSON-ready


def test_a_clean_record_averaged_over_repeats_gets_the_interval_of_its_n():
    averaged = {"model": "m", "attack": "clean", "accuracy": 0.6176, "accuracy_std": 0.004, "repeats": 10,
                "n": 1000}
    add_ci95([averaged])
    assert averaged["ci95"] == list(wilson_interval(618, 1000))


@pytest.mark.parametrize("record, message", [
    ({"accuracy": 0.5, "n": -3}, "n must be an integer >= 0"),
    ({"accuracy": 0.5, "n": 2.5}, "n must be an integer >= 0"),
    ({"accuracy": 1.5, "n": 10}, r"accuracy must be in \[0, 1\]"),
])
def test_add_ci95_refuses_a_malformed_record(record, message):
    with pytest.raises(ValueError, match=message):
        add_ci95([{"model": "m", "attack": "clean", **record}])


def test_record_ci95_prefers_the_stored_interval_and_computes_it_for_older_files():
    assert record_ci95({"accuracy": 0.5, "n": 100, "ci95": [0.4, 0.6]}) == (0.4, 0.6)
    assert record_ci95({"accuracy": 0.5, "n": 100}) == wilson_interval(50, 100)
    assert record_ci95({"accuracy": 0.5, "n": 100.0}) == wilson_interval(50, 100)
    assert record_ci95({"accuracy": 0.5, "n": 100, "ci95": [0.7, 0.2]}) == wilson_interval(50, 100)  # malformed
    assert record_ci95({"accuracy": 0.5}) is None
    assert record_ci95({"accuracy": "high", "n": 10}) is None
