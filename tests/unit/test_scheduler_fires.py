"""The weekly schedule: day names, fire times across zones and DST, fire keys."""
from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from core.config import Settings
from scheduler.fires import check_days, fire_key, parse_time, previous_fire, weekly_trigger, zone

PARIS = ZoneInfo("Europe/Paris")


def test_day_names_only():
    assert check_days("tue") == "tue"
    assert check_days(" Mon,Thu ") == "mon,thu"
    assert check_days("mon-fri") == "mon-fri"
    for bad in ("2", "1-5", "", "tues", "*", "tue,3"):
        with pytest.raises(ValueError, match="day names"):
            check_days(bad)


def test_times_and_zones():
    assert parse_time("09:00") == (9, 0) and parse_time("23:59") == (23, 59)
    for bad in ("9", "24:00", "09:60", "nine"):
        with pytest.raises(ValueError, match="HH:MM"):
            parse_time(bad)
    with pytest.raises(ValueError, match="IANA zone"):
        zone("Mars/Olympus")


def test_tuesday_means_tuesday():
    """crontab '0 9 * * 2' would fire on Wednesday in APScheduler; day names don't."""
    trig = weekly_trigger(Settings(retrain_day="tue", retrain_time="09:00", timezone="Europe/Paris"))
    nxt = trig.get_next_fire_time(None, datetime(2026, 11, 25, 10, 0, tzinfo=PARIS))  # a Wednesday
    assert nxt == datetime(2026, 12, 1, 9, 0, tzinfo=PARIS)
    assert nxt.strftime("%A") == "Tuesday"


def test_previous_fire():
    trig = weekly_trigger(Settings(retrain_day="tue", retrain_time="09:00", timezone="Europe/Paris"))
    assert previous_fire(trig, datetime(2026, 11, 24, 9, 0, tzinfo=PARIS)) == \
        datetime(2026, 11, 24, 9, 0, tzinfo=PARIS)
    assert previous_fire(trig, datetime(2026, 11, 24, 8, 59, tzinfo=PARIS)) == \
        datetime(2026, 11, 17, 9, 0, tzinfo=PARIS)
    # across the end of summer time (25 Oct 2026): still 09:00 wall-clock
    prev = previous_fire(trig, datetime(2026, 10, 27, 10, 0, tzinfo=PARIS))
    assert prev == datetime(2026, 10, 27, 9, 0, tzinfo=PARIS)
    assert prev.utcoffset().total_seconds() == 3600


def test_previous_fire_with_several_days():
    trig = weekly_trigger(Settings(retrain_day="mon,thu", retrain_time="06:30", timezone="UTC"))
    utc = ZoneInfo("UTC")
    assert previous_fire(trig, datetime(2026, 11, 25, 12, 0, tzinfo=utc)) == \
        datetime(2026, 11, 23, 6, 30, tzinfo=utc)


def test_fire_keys_use_the_iso_week():
    assert fire_key(datetime(2026, 11, 24, 9, 0, tzinfo=PARIS), "tue") == "2026-W48"
    # 31 Dec 2024 is a Tuesday in ISO week 1 of 2025: the ISO year, not the calendar year
    assert fire_key(datetime(2024, 12, 31, 9, 0, tzinfo=PARIS), "tue") == "2025-W01"
    assert fire_key(datetime(2026, 12, 29, 9, 0, tzinfo=PARIS), "tue") == "2026-W53"
    assert fire_key(datetime(2026, 11, 26, 6, 30, tzinfo=PARIS), "mon,thu") == "2026-W48-thu"
