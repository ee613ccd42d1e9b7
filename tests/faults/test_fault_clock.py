"""The wall clock stepped by hours under a running daemon (libfaketime from Debian's `faketime`, with
FAKETIME_DONT_FAKE_MONOTONIC=1 and the offset re-read from a file every second, so the test steps it
while the daemon runs): sessions and leases keep time on the steady clock (daemon/sessions/clock.py)."""
from __future__ import annotations

import threading
import time

import pytest

from support import chat
from support.faults import SteppedClock, faketime_lib
from support.servers import Daemon

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(faketime_lib() is None, reason="libfaketime is not installed "
                                 "(make test-deps installs Debian's faketime)")]
MID = 6000  # several seconds of builtin:tiny decode (2,000 took 1.1 s): the turn outlasts the step (1.5 s)
TTL_S = 4


@pytest.fixture(scope="module")
def clocks(tmp_path_factory, cache_dir):
    """fwd: the default TTL, a short queue timeout; back: a 4 s TTL. Each under its own clock."""
    made = {}
    for name, args in (("fwd", ("--queue-timeout-s", "3")), ("back", ("--session-ttl-s", str(TTL_S)))):
        root = tmp_path_factory.mktemp(f"clock-{name}")
        clock = SteppedClock(root)
        # one thread: as fast on builtin:tiny, and no spin barrier waits on a core another process took
        made[name] = (Daemon(root, cache_dir, "--threads", "1", "--min-new-tokens", str(MID), "--max-new-tokens",
                             str(MID), *args, env=clock.env()), clock)
    threads = [threading.Thread(target=d.start) for d, _ in made.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    yield made
    for d, _ in made.values():
        d.stop()


def test_a_forward_step_evicts_no_recent_session_and_expires_no_running_lease(clocks):
    d, clock = clocks["fwd"]
    recent = chat.new_session(d.url)
    assert chat.turn(d.url, recent, "just now").status == 200
    busy = chat.new_session(d.url)
    second: dict = {}

    def during() -> None:
        clock.step("+2h")  # NTP finds the right time mid-turn
        second["reply"] = chat.turn(d.url, busy, "a second turn while the first runs")

    first = chat.turn(d.url, busy, "a long turn", stream=True, max_tokens=MID, on_first_event=during)
    assert second["reply"].status == 409, second["reply"].body  # the lease held through the step
    assert first.done and first.events[-1]["turn"] == 1
    time.sleep(3)  # several housekeeping sweeps (every 1 s) on the stepped clock
    stored = chat.history(d.url, recent)
    assert stored is not None and stored[0]["content"] == "just now"  # idle 2 h by the wall: kept
    assert chat.turn(d.url, recent, "after the step").status == 200
    assert chat.metric(d.url, "edgechat_sessions_evicted_total", reason="ttl") == 0
    clock.step("+0")


def test_a_backward_step_keeps_nothing_past_its_time(clocks):
    d, clock = clocks["back"]
    sid = chat.new_session(d.url)
    assert chat.turn(d.url, sid, "before the step back").status == 200
    clock.step("-2h")  # by the wall, the session was last used 2 h in the future
    chat.eventually(lambda: chat.history(d.url, sid) is None, TTL_S + 10,
                    f"the session expired {TTL_S} s after its turn, step or not")
    assert chat.metric(d.url, "edgechat_sessions_evicted_total", reason="ttl") >= 1
    again = chat.new_session(d.url)  # leases on the same clock: a turn starts and ends normally
    assert chat.turn(d.url, again, "after the step back").status == 200
    clock.step("+0")
