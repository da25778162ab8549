"""How the aggregator cuts what waits into store transactions (pure logic)."""

from services.aggregator.service import BATCH_BYTES
from switchboard.wire import batch_length


def test_a_batch_stops_before_its_bytes_would_exceed_the_limit():
    assert batch_length([], BATCH_BYTES) == 0
    assert batch_length([100] * 50, BATCH_BYTES) == 50
    assert batch_length([BATCH_BYTES // 2] * 5, BATCH_BYTES) == 2
    assert batch_length([BATCH_BYTES // 2, BATCH_BYTES // 2 + 1, 10], BATCH_BYTES) == 1


def test_one_outcome_larger_than_the_limit_still_goes_alone():
    assert batch_length([BATCH_BYTES * 3, 10, 10], BATCH_BYTES) == 1
    assert batch_length([10, BATCH_BYTES * 3], BATCH_BYTES) == 1
