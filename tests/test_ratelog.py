"""RateLimitedLog: a burst of lines per interval, then silence and a count."""

import logging

from blockrep.shell.ratelog import RateLimitedLog


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_burst_then_count(caplog):
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), interval=10, burst=3, clock=clock)
    with caplog.at_level(logging.ERROR, "t.ratelog"):
        logged = [rl.error("disk", "fail %d", i) for i in range(1000)]
        assert logged.count(True) == 3 and logged[:3] == [True] * 3
        assert "suppressed for 10 s" in caplog.records[2].getMessage()
        assert rl.error("other", "a different kind is not held back")
        clock.t += 10
        assert rl.error("disk", "fail again")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 6
    assert msgs[4] == "disk: 997 similar message(s) suppressed in the last 10 s"
    assert msgs[5] == "fail again"
