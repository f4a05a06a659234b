"""The ETA and the progress lines (plain unit tests; the plugin's lines are in test_outputs_plugin.py)."""

from __future__ import annotations

import pytest

from pytest_llamabench.progress import Eta, PlannedTest, Repetition, duration, finished_line, planned_from_ids, workload_size


def _plan() -> list[PlannedTest]:
    return [PlannedTest(f"t[{c}-{w}]", c, w, size) for c in ("a", "b", "c") for w, size in (("short", 1.0), ("long", 4.0))]


def test_no_estimate_before_a_test_finished() -> None:
    eta = Eta(_plan())
    assert eta.remaining_s() is None
    assert (eta.count, eta.total) == (0, 6)


def test_remaining_tests_take_what_their_workload_took() -> None:
    eta = Eta(_plan())
    eta.server_ready("a", 2.0)
    eta.finished("t[a-short]", 10.0)
    eta.finished("t[a-long]", 30.0)
    # 2 short x 10 s + 2 long x 30 s + 2 server starts x 2 s
    assert eta.remaining_s() == pytest.approx(84.0)
    eta.finished("t[b-short]", 20.0)  # b's server has started: its load is no longer ahead
    assert eta.remaining_s() == pytest.approx(15.0 + 2 * 30.0 + 2.0)


def test_an_unseen_workload_is_scaled_by_its_size_and_workers_share_the_rest() -> None:
    eta = Eta(_plan(), workers=2)
    eta.finished("t[a-short]", 10.0)  # 10 s per unit of size; long = 4 units
    assert eta.remaining_s() == pytest.approx((2 * 10.0 + 3 * 40.0) / 2)


def test_the_line_of_a_finished_test() -> None:
    eta = Eta(_plan())
    eta.finished("t[a-short]", 5.9)
    line = finished_line(eta, eta.plan["t[a-short]"], "t[a-short]", "passed", 5.9, 69.64)
    assert line == "[1/6] a/short passed · 69.6 tok/s · 6 s · ETA 1 min 22 s"  # 2 x 5.9 s + 3 long x 4 x 5.9 s
    for test in list(eta.plan)[1:]:
        eta.finished(test, 1.0)
    assert "ETA" not in finished_line(eta, None, "t[c-long]", "failed", 0.25)  # the last one: nothing left


def test_durations_read_like_a_person_writes_them() -> None:
    assert [duration(s) for s in (0.4, 59, 200, 3725)] == ["0 s", "59 s", "3 min 20 s", "1 h 02 min"]


def test_repetitions_count_warmups_apart() -> None:
    assert Repetition("C7", "long", 1, 4, 1, 2.0).text() == "C7/long: warm-up 1/1"
    assert Repetition("C7", "long", 3, 4, 1, 2.0).text() == "C7/long: repetition 2/3"


def test_xdist_ids_are_matched_to_configs_and_workloads_with_dashes() -> None:
    ids = ["b/test_m.py::test_workload[kv-q8-multi-turn]", "b/test_m.py::test_workload[kv-q8@2-short]",
           "b/test_m.py::test_other", "b/test_m.py::test_workload[base-multi-turn]"]  # fmt: skip
    plan = planned_from_ids(ids, ["kv-q8", "kv-q8@2", "base"], {"short": 1.0, "multi-turn": 3.0})
    assert [(p.instance, p.workload, p.size) for p in plan] == [
        ("kv-q8", "multi-turn", 3.0), ("kv-q8@2", "short", 1.0), ("base", "multi-turn", 3.0)]


def test_workload_size_weighs_prompt_tokens_less() -> None:
    assert workload_size(1024, 128, 4) == 4 * (128 + 256)
    assert workload_size(64, 48, 4, turns=3) == 12 * (48 + 16)
