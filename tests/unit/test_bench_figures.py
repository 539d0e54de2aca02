"""The scale scenario's figures (bench/report.py `scale_figures`) from known send and answer
times: the longest pause per step and the most records waiting."""

from __future__ import annotations

from bench.report import scale_figures


def test_a_pause_across_a_step_change_shows_in_both_steps_and_the_backlog_peaks_in_it() -> None:
    # One record sent every 100 ms for 3 s; answered 50 ms later, except that nothing is
    # answered between 1,000 and 1,800 ms (a rebalance at 1,200), then all at once.
    sent = list(range(0, 3000, 100))
    answered = [t + 50 if not 950 <= t + 50 < 1800 else 1800 for t in sent]
    steps, series = scale_figures(sent, answered, [(0, 1), (1200, 3)], 3000, tick_ms=100)
    assert [s["processes"] for s in steps] == [1, 3]
    assert [s["longest_gap_ms"] for s in steps] == [1800 - 850, 1800 - 850]
    assert steps[0]["peak_waiting"] == 4  # sent 900 .. 1,200, none answered by 1,200
    assert steps[1]["peak_waiting"] == 9  # sent 1,000 .. 1,700, waiting until 1,800
    assert sum(s["answered"] for s in steps) == len(sent)
    assert max(p[2] for p in series) == 9


def test_steady_answers_give_short_gaps_and_no_backlog_left() -> None:
    sent = list(range(0, 2000, 10))
    answered = [t + 5 for t in sent]
    steps, series = scale_figures(sent, answered, [(0, 1)], 2000, tick_ms=50)
    assert steps[0]["longest_gap_ms"] == 10
    assert steps[0]["peak_waiting"] <= 1
    assert series[-1][2] == 0
