"""The guard rails that pick an automatic run's mode, and the expected times per mode."""
import pytest

from core.config import Settings
from core.ct_policy import choose_mode, expected_seconds, last_full
from core.types import RunRecord


def run(i: int, mode: str = "full", state: str = "succeeded", decision: str = "deploy",
        seconds: float = 100.0) -> RunRecord:
    return RunRecord(run_id=f"r-{i}", model="m", trigger="new_data", reason="", requested_by="scheduler",
                     params={"mode": mode}, state=state, decision=decision if state == "succeeded" else "",
                     started_at=1000.0 * i, finished_at=1000.0 * i + seconds)


def newest_first(*runs):
    return list(reversed(runs))


def test_the_configured_mode_when_nothing_went_wrong():
    assert choose_mode("refresh", newest_first(run(1), run(2, "refresh"))) == (
        "refresh", "the configured mode is refresh")
    assert choose_mode("full", []) == ("full", "the configured mode is full")


def test_after_max_refreshes_in_a_row_the_next_is_warm():
    history = newest_first(run(1), *(run(i, "refresh") for i in range(2, 7)))   # 5 refreshes
    mode, why = choose_mode("refresh", history, max_refresh_in_a_row=5)
    assert mode == "warm" and "5 refreshes in a row" in why and "refresh.max_in_a_row (5)" in why
    assert choose_mode("refresh", history[:4], max_refresh_in_a_row=5)[0] == "refresh"
    # the warm run resets the count
    assert choose_mode("refresh", [run(9, "warm"), *history], max_refresh_in_a_row=5)[0] == "refresh"


def test_a_refresh_held_by_the_gate_is_followed_by_warm():
    history = newest_first(run(1), run(2, "refresh", decision="hold"))
    assert choose_mode("refresh", history) == ("warm", "the last refresh run `r-2` was held by the gate")
    failed = newest_first(run(1), run(2, "refresh", state="failed"))
    assert choose_mode("refresh", failed) == ("warm", "the last refresh run `r-2` failed")


def test_a_warm_held_by_the_gate_is_followed_by_full():
    history = newest_first(run(1), run(2, "refresh", decision="hold"), run(3, "warm", decision="hold"))
    assert choose_mode("refresh", history) == ("full", "the last warm run `r-3` was held by the gate")
    assert choose_mode("warm", history)[0] == "full"


def test_escalation_never_lowers_the_configured_mode():
    history = newest_first(run(1, "refresh", decision="hold"))
    assert choose_mode("full", history)[0] == "full"


def test_runs_still_going_or_canceled_are_passed_over():
    history = newest_first(run(1, "refresh", decision="hold"), run(2, "full", state="canceled"),
                           run(3, "full", state="running"))
    assert choose_mode("refresh", history)[0] == "warm"


def test_no_production_means_full():
    assert choose_mode("refresh", [], has_production=False) == (
        "full", "refresh needs a production model and there is none yet")


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        choose_mode("fast", [])


def test_expected_seconds_is_the_median_of_the_last_runs_of_that_mode():
    history = newest_first(run(1, seconds=90), run(2, seconds=110), run(3, "refresh", seconds=8),
                           run(4, seconds=100), run(5, "refresh", seconds=12), run(6, state="failed"))
    assert expected_seconds(history, "full") == 100
    assert expected_seconds(history, "refresh") == 10
    assert expected_seconds(history, "warm") is None
    assert last_full(history).run_id == "r-4"
    assert last_full(history, before="r-4").run_id == "r-2"


def test_config_on_new_data_and_schedule_mode():
    assert Settings().on_new_data == "alert" and Settings().schedule.mode == "full"
    assert Settings().ct.refresh.max_in_a_row == 5
    assert Settings(auto_retrain=True).on_new_data == "full"              # the older switch
    assert Settings(auto_retrain=True, ct={"on_new_data": "refresh"}).on_new_data == "refresh"
    assert Settings(ct={"on_new_data": "alert"}, auto_retrain=True).on_new_data == "alert"
    s = Settings(ct={"on_new_data": "warm", "refresh": {"max_in_a_row": 3}}, schedule={"mode": "refresh"})
    assert (s.on_new_data, s.ct.refresh.max_in_a_row, s.schedule.mode) == ("warm", 3, "refresh")
    with pytest.raises(ValueError):
        Settings(ct={"on_new_data": "sometimes"})
