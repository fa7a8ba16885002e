"""The ack path's deadline is in Redis's clock; the offset to it comes from TIME round
trips (core.state.clock_offset). A slow round trip (a busy machine) must not move it."""
from core.state import clock_offset


def test_the_fastest_round_trip_sets_the_offset():
    # Redis's clock is 2.0 s ahead; each sample is within half its round trip of that.
    assert clock_offset([(0.0004, 2.0001), (0.0002, 1.99995), (0.0006, 2.0002)]) == 1.99995


def test_a_slow_round_trip_does_not_shift_the_deadline():
    # Redis answered at once, then our process waited 0.28 s to read it (a busy machine):
    # the midpoint says Redis is 0.14 s behind. As the latest sample it would have made
    # every deadline 0.14 s early, leaving a command 0.06 s of its 0.2 s.
    fast, slow_read = (0.0003, 0.0), (0.28, -0.14)
    assert clock_offset([fast, slow_read]) == 0.0
    assert clock_offset([slow_read, fast]) == 0.0
