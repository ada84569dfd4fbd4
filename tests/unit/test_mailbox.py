"""The main loop's mailbox and the isolation of handlers."""

from __future__ import annotations

import functools
import selectors
import threading
from concurrent.futures import Future

import pytest

from egress_monitor.isolation import Isolation
from egress_monitor.mailbox import Mailbox, MailboxClosed


def test_jobs_run_on_the_owner_thread_and_return_results() -> None:
    errors: list[tuple[str, BaseException]] = []
    box = Mailbox(lambda w, e: errors.append((w, e)))
    ran_on: list[str] = []
    futures: list[Future[int]] = []

    def job(i: int) -> int:
        ran_on.append(threading.current_thread().name)
        return i * i

    def poster() -> None:
        for i in range(5):
            futures.append(box.post("dns_query", functools.partial(job, i)))

    t = threading.Thread(target=poster, name="resolver")
    t.start()
    t.join()
    sel = selectors.DefaultSelector()
    sel.register(box.fileno(), selectors.EVENT_READ)
    assert sel.select(timeout=1), "posting wakes the owner's selector"
    assert box.run_pending() == 5
    assert [f.result(timeout=0) for f in futures] == [0, 1, 4, 9, 16]
    assert set(ran_on) == {threading.current_thread().name} and not errors
    box.close()


def test_a_failing_job_is_reported_and_the_next_still_runs() -> None:
    errors: list[str] = []
    box = Mailbox(lambda w, e: errors.append(f"{w}: {e}"))
    bad = box.post("sinkhole", lambda: 1 // 0)
    good = box.post("sinkhole", lambda: "ok")
    assert box.run_pending() == 2
    assert errors == ["sinkhole: integer division or modulo by zero"]
    with pytest.raises(ZeroDivisionError):
        bad.result(timeout=0)
    assert good.result(timeout=0) == "ok"
    box.close()


def test_close_fails_waiting_and_later_jobs_so_no_thread_hangs() -> None:
    box = Mailbox(lambda w, e: None)
    waiting = box.post("dns_query", lambda: "never")
    box.close()
    with pytest.raises(MailboxClosed):
        waiting.result(timeout=0)
    with pytest.raises(MailboxClosed):
        box.post("dns_query", lambda: "late").result(timeout=0)


def test_a_flood_is_refused_not_queued_without_bound() -> None:
    box = Mailbox(lambda w, e: None, max_pending=3)
    futures = [box.post("sinkhole", lambda: None) for _ in range(5)]
    assert [f.done() for f in futures] == [False, False, False, True, True]
    assert box.run_pending() == 3
    box.close()


def test_isolation_counts_logs_once_a_minute_and_runs_the_fallback(
        caplog: pytest.LogCaptureFixture) -> None:
    counted: list[str] = []
    now = [0.0]
    iso = Isolation(counted.append, clock=lambda: now[0])
    refused: list[int] = []

    def boom() -> None:
        raise ValueError("hostile")

    for _ in range(3):
        assert iso.run("packet", boom, fallback=lambda: refused.append(1)) is None
    now[0] = 61.0
    iso.run("packet", boom)
    assert counted == ["packet"] * 4 and refused == [1, 1, 1]
    logged = [r for r in caplog.records if "internal error in packet" in r.getMessage()]
    assert len(logged) == 2 and logged[0].exc_info is not None
    assert "2 more since the last one logged" in logged[1].getMessage()
    assert iso.run("tick", lambda: 7) == 7


def test_a_failing_fallback_is_contained_too() -> None:
    counted: list[str] = []
    iso = Isolation(counted.append)

    def boom() -> None:
        raise RuntimeError("x")

    assert iso.run("packet", boom, fallback=boom) is None
    assert counted == ["packet", "packet"]


def test_one_pass_is_bounded_in_time_and_wakes_the_loop_for_the_rest() -> None:
    import time

    box = Mailbox(lambda w, e: None)
    futures = [box.post("dns_query", lambda: time.sleep(0.02)) for _ in range(10)]
    ran = box.run_pending(budget_s=0.05)
    assert 1 <= ran < 10
    sel = selectors.DefaultSelector()
    sel.register(box.fileno(), selectors.EVENT_READ)
    assert sel.select(timeout=0), "the rest wake the selector again"
    while box.run_pending(budget_s=0.05):
        pass
    assert all(f.done() for f in futures)
    box.close()
