"""Contract tests every SessionStore backend must pass (parametrized over backends via `store_factory`)."""
from __future__ import annotations

import base64
import dataclasses
import gc
import math
import random
import sys
import threading

import pytest

from daemon.sessions import (ContextTooLong, HistoryPolicy, MemoryStore, SessionBusy, SessionNotFound,
                             SessionStore, StoreStats, make_store)
from support.fakes import FakeClock, count_words

# name -> URL builder, given the test's request (tmp_path for file stores, a fresh Redis database)
BACKEND_URLS = {"memory": lambda request: "memory",
                "sqlite": lambda request: f"sqlite://{request.getfixturevalue('tmp_path')}/sessions.db",
                "redis": lambda request: _fresh_redis(request.getfixturevalue("redis_server"))}


def _fresh_redis(server) -> str:
    server.client().flushdb()  # each test starts from an empty database
    return server.url

POLICY = HistoryPolicy(max_turns=5, max_tokens=0, ttl_s=600, max_sessions=100)


class CountingCounter:
    def __init__(self):
        self.calls = 0

    def __call__(self, messages):
        self.calls += 1
        return count_words(messages)


class RecordingListener:
    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def on_truncate(self, reason, messages):
        with self.lock:
            self.events.append(("truncate", reason, messages))

    def on_evict(self, reason, sessions):
        with self.lock:
            self.events.append(("evict", reason, sessions))

    def on_store_op(self, operation, seconds):
        """Store latencies: not what these tests watch."""

    def total(self, kind, reason=None):
        return sum(n for k, r, n in self.events if k == kind and (reason is None or r == reason))


@pytest.fixture(params=sorted(BACKEND_URLS))
def store_factory(request):
    stores = []
    url = BACKEND_URLS[request.param](request)

    def make(policy=POLICY, *, count_tokens=count_words, clock=None, listener=None) -> SessionStore:
        store = make_store(policy, count_tokens, url=url, clock=clock or FakeClock(), listener=listener)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def words(n, tag="w"):
    return " ".join(f"{tag}{i}" for i in range(n))


def chat(store, sid, n, owner=None, start=0, size=1):
    """Commit n turns with distinct contents; returns the (user, assistant) pairs committed."""
    pairs = []
    for i in range(start, start + n):
        user, reply = f"u{i} {words(size - 1)}".strip(), f"a{i} {words(size - 1)}".strip()
        with store.turn(sid, owner, user) as t:
            t.commit(reply)
        pairs.append((user, reply))
    return pairs


def flat(pairs):
    return [{"role": r, "content": c} for u, a in pairs for r, c in (("user", u), ("assistant", a))]


# -- basics -------------------------------------------------------------------------------------------

def test_create_get_roundtrip(store_factory):
    clock = FakeClock()
    store = store_factory(clock=clock)
    snap = store.create("k1", system="be brief")
    assert store.get(snap.id, "k1") == snap
    assert (snap.owner, snap.system, snap.messages, snap.turns, snap.truncations) == ("k1", "be brief", (), 0, 0)
    assert snap.created == snap.last_active == clock.t
    assert snap.tokens == count_words([{"role": "system", "content": "be brief"}])
    assert store.create(None).tokens == 0  # an empty conversation is never tokenized


def test_ids_unique_and_unguessable(store_factory):
    store = store_factory(HistoryPolicy(0, 0, 0, 0))
    ids = [store.create(None).id for _ in range(300)]
    assert len(set(ids)) == len(ids)
    for sid in ids:
        raw = base64.urlsafe_b64decode(sid + "=" * (-len(sid) % 4))
        assert len(raw) * 8 >= 128


@pytest.mark.parametrize("creator, reader, visible", [
    ("k1", "k1", True), ("k1", "k2", False), ("k1", None, False), (None, None, True), (None, "k1", False)])
def test_owner_isolation(store_factory, creator, reader, visible):
    store = store_factory()
    sid = store.create(creator).id
    chat(store, sid, 1, owner=creator)
    if visible:
        assert store.get(sid, reader).turns == 1
        with store.turn(sid, reader, "hi") as t:
            assert t.index == 2
        return
    with pytest.raises(SessionNotFound):
        store.get(sid, reader)
    with pytest.raises(SessionNotFound):
        store.turn(sid, reader, "hi")
    with pytest.raises(SessionNotFound):
        store.delete(sid, reader)
    assert store.get(sid, creator).turns == 1  # still there, untouched


def test_unknown_session(store_factory):
    store = store_factory()
    for call in (lambda: store.get("nope", None), lambda: store.delete("nope", None),
                 lambda: store.turn("nope", None, "hi")):
        with pytest.raises(SessionNotFound) as err:
            call()
        assert "nope" not in str(err.value)


def test_snapshots_and_prompts_are_copies(store_factory):
    store = store_factory()
    sid = store.create(None, system="sys").id
    chat(store, sid, 1)
    store.get(sid, None).messages[0]["content"] = "mutated"
    with store.turn(sid, None, "second") as t:
        t.prompt.clear()
        t.prompt_tokens = -1
        result = t.commit("reply")
    assert result.session.messages == tuple(flat([("u0", "a0"), ("second", "reply")]))
    assert store.get(sid, None) == result.session


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["list"]])
def test_non_text_content_rejected(store_factory, bad):
    store = store_factory()
    sid = store.create(None).id
    with pytest.raises(TypeError):
        store.turn(sid, None, bad)
    before = store.get(sid, None)
    with store.turn(sid, None, "fine") as t:
        with pytest.raises(TypeError):
            t.commit(bad)
    assert store.get(sid, None) == before


# -- trimming -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_turns", [1, 2, 5])
@pytest.mark.parametrize("system", [None, "you are terse"])
def test_trim_by_turns(store_factory, max_turns, system):
    listener = RecordingListener()
    store = store_factory(HistoryPolicy(max_turns, 0, 0, 0), listener=listener)
    sid = store.create(None, system=system).id
    log = []
    for i in range(3 * max_turns + 2):
        with store.turn(sid, None, f"u{i}") as t:
            assert t.prompt == ([{"role": "system", "content": system}] if system else []) \
                + flat(log[-max_turns:]) + [{"role": "user", "content": f"u{i}"}]
            assert t.dropped == 0 and t.index == i + 1
            result = t.commit(f"a{i}")
        log.append((f"u{i}", f"a{i}"))
        snap = result.session
        assert snap.messages == tuple(flat(log[-max_turns:]))
        assert result.truncated == (2 if i >= max_turns else 0)
        assert snap.truncations == 2 * (i + 1) - len(snap.messages)
        assert snap.system == system and snap.turns == i + 1
    assert listener.events == [("truncate", "turns", 2)] * (2 * max_turns + 2)


def test_trim_by_tokens_drops_oldest_whole_turns(store_factory):
    listener = RecordingListener()
    # each committed turn costs 2 * (5 words + 4) = 18 tokens; the base prompt costs 3
    store = store_factory(HistoryPolicy(0, 60, 0, 0), listener=listener)
    sid = store.create(None).id
    log = chat(store, sid, 3, size=5)  # 3 + 54 = 57 tokens stored
    assert store.get(sid, None).tokens == 57
    with store.turn(sid, None, words(5, "x")) as t:  # + 9 -> 66 > 60: drop the oldest turn
        assert t.prompt == flat(log[1:]) + [{"role": "user", "content": words(5, "x")}]
        assert (t.dropped, t.prompt_tokens) == (2, 48)
        result = t.commit(words(5, "y"))
    # prompt-time drop (2) + stored 3 turns = 57 tokens fits: nothing more at commit
    assert result.truncated == 2 and result.session.tokens == 57
    assert result.session.messages == tuple(flat(log[1:] + [(words(5, "x"), words(5, "y"))]))
    assert listener.events == [("truncate", "tokens", 2)]
    # a big reply makes the stored history itself trim at commit time
    with store.turn(sid, None, "q") as t:  # 57 + 5 = 62 > 60 -> drop one turn at prompt time
        assert t.dropped == 2
        result = t.commit(words(30, "z"))  # 3 + 2 turns + 5 + 34 = 78 -> drop one more: 60
    snap = result.session
    assert snap.tokens <= 60 and snap.tokens == count_words(snap.messages)
    assert snap.messages[-2:] == ({"role": "user", "content": "q"}, {"role": "assistant", "content": words(30, "z")})
    assert result.truncated == 4 and snap.truncations == 6 and snap.tokens == 60
    assert listener.events == [("truncate", "tokens", 2), ("truncate", "tokens", 4)]


def test_system_prompt_always_kept(store_factory):
    system = words(20, "s")
    store = store_factory(HistoryPolicy(1, 60, 0, 0))
    sid = store.create(None, system=system).id
    for i in range(10):
        with store.turn(sid, None, words(10, f"u{i}-")) as t:
            assert t.prompt[0] == {"role": "system", "content": system}
            assert t.prompt_tokens <= 60
            snap = t.commit(words(6, f"a{i}-")).session
        assert snap.system == system and snap.tokens <= 60
        assert all(m["role"] != "system" for m in snap.messages)


POLICIES = [HistoryPolicy(0, 0, 0, 0), HistoryPolicy(4, 0, 0, 0), HistoryPolicy(0, 90, 0, 0),
            HistoryPolicy(3, 120, 0, 0), HistoryPolicy(2, 45, 0, 0), HistoryPolicy(6, 200, 0, 0)]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@pytest.mark.parametrize("system", [None, "be kind and short"])
def test_trimming_invariants_random(store_factory, policy, system):
    """Random message sizes: whole oldest turns go first, budgets hold, trimming is minimal and counted."""
    rng = random.Random(f"{policy}{system}")
    listener = RecordingListener()
    store = store_factory(policy, listener=listener)
    sid = store.create(None, system=system).id
    head = [{"role": "system", "content": system}] if system else []
    log, stored = [], []
    for i in range(60):
        user = words(rng.randint(1, 12), f"u{i}.")
        try:
            t = store.turn(sid, None, user)
        except ContextTooLong as err:  # only when system + this message alone exceed the budget
            assert count_words(head + [{"role": "user", "content": user}]) == err.tokens > policy.max_tokens
            continue
        with t:
            history = t.prompt[len(head):-1]
            assert t.prompt[:len(head)] == head and t.prompt[-1] == {"role": "user", "content": user}
            assert history == stored[len(stored) - len(history):] and len(history) % 2 == 0
            assert t.dropped == len(stored) - len(history)
            assert t.prompt_tokens == count_words(t.prompt)
            if policy.max_tokens:
                assert t.prompt_tokens <= policy.max_tokens
            if policy.max_turns:
                assert len(history) <= 2 * policy.max_turns
            reply = words(rng.randint(1, 12), f"a{i}.")
            result = t.commit(reply)
        log.append((user, reply))
        candidate = history + flat([(user, reply)])
        snap = result.session
        stored = list(snap.messages)
        assert stored == candidate[len(candidate) - len(stored):] and len(stored) % 2 == 0
        assert result.truncated == t.dropped + len(candidate) - len(stored)
        assert snap.tokens == (count_words(head + stored) if head + stored else 0)
        if policy.max_turns:
            assert len(stored) <= 2 * policy.max_turns
        if policy.max_tokens:
            assert snap.tokens <= policy.max_tokens
            must_drop = max(0, len(candidate) // 2 - policy.max_turns) if policy.max_turns else 0
            if len(candidate) - len(stored) > 2 * must_drop:  # dropped for tokens: one turn more would not fit
                assert count_words(head + candidate[len(candidate) - len(stored) - 2:]) > policy.max_tokens
        assert snap.truncations == 2 * snap.turns - len(stored) == listener.total("truncate")
    assert log, "the matrix must commit turns"
    if policy == HistoryPolicy(0, 0, 0, 0):
        assert stored == flat(log) and listener.events == []


@pytest.mark.parametrize("trim", [True, False])
def test_context_too_long_changes_nothing(store_factory, trim):
    listener = RecordingListener()
    counter = CountingCounter()
    store = store_factory(HistoryPolicy(5, 50, 0, 0, trim=trim), count_tokens=counter, listener=listener)
    sid = store.create(None, system="sys").id
    chat(store, sid, 2, size=3)
    before = store.get(sid, None)
    with pytest.raises(ContextTooLong) as err:
        store.turn(sid, None, words(60))
    expected = count_words([{"role": "system", "content": "sys"}, {"role": "user", "content": words(60)}])
    if not trim:  # leak mode reports the whole untrimmed prompt
        expected += 2 * (3 + 4) * 2
    assert (err.value.tokens, err.value.limit) == (expected, 50)
    assert store.get(sid, None) == before and listener.events == []
    with store.turn(sid, None, "next", timeout=0) as t:  # the lock was released
        assert t.index == 3


def test_leak_mode_context_too_long_on_full_prompt(store_factory):
    store = store_factory(HistoryPolicy(2, 100, 0, 0, trim=False))
    sid = store.create(None).id
    committed = 0
    with pytest.raises(ContextTooLong):
        for _ in range(50):  # each turn adds 14 tokens: the 8th prompt needs 108 > 100
            chat(store, sid, 1, start=committed, size=3)
            committed += 1
    snap = store.get(sid, None)
    assert snap.turns == committed == 7 and len(snap.messages) == 14 and snap.truncations == 0


def test_system_prompt_that_can_never_fit_is_refused_at_creation(store_factory):
    store = store_factory(HistoryPolicy(5, 20, 0, 0))
    with pytest.raises(ContextTooLong) as err:
        store.create(None, system=words(30))
    # the system prompt with an empty user message: the least any turn could need
    assert err.value.limit == 20 and err.value.tokens > 20
    assert store.stats().sessions == 0  # nothing stored
    fits = store.create(None, system=words(5))
    assert store.get(fits.id, None).tokens == 3 + 5 + 4


def test_stale_commit_is_rejected(store_factory):
    """Backend contract: _commit is a compare-and-swap on version, so a commit from a stale read never lands."""
    store = store_factory()
    sid = store.create(None).id
    record, lease = store._acquire(sid, None, 0)
    store._release(sid, lease)
    chat(store, sid, 1)
    with pytest.raises(SessionNotFound):
        store._commit(record, dataclasses.replace(record, turns=99, version=record.version + 1))
    assert store.get(sid, None).turns == 1


@pytest.mark.parametrize("trim, max_turns", [(True, 5), (False, 5), (True, 1)])
def test_leak_mode_grows_while_default_stays_bounded(store_factory, trim, max_turns):
    listener = RecordingListener()
    store = store_factory(HistoryPolicy(max_turns, 10**9, 0, 0, trim=trim), listener=listener)
    sid = store.create(None, system="sys").id
    for i in range(1, 501):
        with store.turn(sid, None, f"u{i}") as t:
            snap = t.commit(f"a{i}").session
        if trim:
            assert len(snap.messages) == 2 * min(i, max_turns)
        else:
            assert len(snap.messages) == 2 * i and snap.truncations == 0
    assert store.policy.max_turns == max_turns  # the configured limit is still what is reported
    assert listener.total("truncate") == (2 * (500 - max_turns) if trim else 0)


def test_count_tokens_called_sparingly(store_factory):
    counter = CountingCounter()
    store = store_factory(HistoryPolicy(0, 2000, 0, 0), count_tokens=counter)
    sid = store.create(None).id
    chat(store, sid, 128, size=1)  # 128 turns x 10 tokens
    assert counter.calls == 2 * 128  # steady state: the prompt once, the stored history once
    counter.calls = 0
    store.get(sid, None)
    store.stats()
    assert counter.calls == 0
    with store.turn(sid, None, words(1200)) as t:  # 1283 + 1204 > 2000: keep 79 of 128 turns
        assert t.dropped == 2 * 49
        calls_at_prompt = counter.calls
        t.commit("ok")
    bound = 2 + math.ceil(math.log2(128)) + 1
    assert calls_at_prompt <= bound and counter.calls - calls_at_prompt <= bound


# -- turn lifecycle -----------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["exception", "no_commit", "close"])
def test_uncommitted_turn_changes_nothing(store_factory, how):
    listener = RecordingListener()
    clock = FakeClock()
    store = store_factory(HistoryPolicy(2, 0, 600, 0), clock=clock, listener=listener)
    sid = store.create(None).id
    chat(store, sid, 2)  # full: the next commit would trim
    before, events = store.get(sid, None), list(listener.events)
    clock.advance(5)
    if how == "exception":
        with pytest.raises(KeyError):
            with store.turn(sid, None, "lost"):
                raise KeyError("client went away")
    elif how == "no_commit":
        with store.turn(sid, None, "lost"):
            pass
    else:
        store.turn(sid, None, "lost").close()
    assert store.get(sid, None) == before and listener.events == events
    with store.turn(sid, None, "kept", timeout=0) as t:
        assert t.index == 3


def test_commit_only_once_and_inside_block(store_factory):
    store = store_factory()
    sid = store.create(None).id
    with store.turn(sid, None, "one") as t:
        t.commit("r1")
        with pytest.raises(RuntimeError):
            t.commit("r1 again")
    with pytest.raises(RuntimeError):
        t.commit("late")
    assert store.get(sid, None).messages == tuple(flat([("one", "r1")]))


def test_forgotten_turn_releases_lock_when_collected(store_factory):
    store = store_factory()
    sid = store.create(None).id
    t = store.turn(sid, None, "abandoned")
    with pytest.raises(SessionBusy):
        store.turn(sid, None, "blocked", timeout=0)
    del t
    gc.collect()
    with store.turn(sid, None, "free", timeout=0) as t:
        assert t.index == 1


def test_busy_session_times_out_other_sessions_proceed(store_factory):
    store = store_factory()
    a, b = store.create(None).id, store.create(None).id
    with store.turn(a, None, "holding"):
        with pytest.raises(SessionBusy):
            store.turn(a, None, "waits", timeout=0.05)
        with store.turn(b, None, "independent", timeout=0) as tb:
            tb.commit("done")
    assert store.get(a, None).turns == 0 and store.get(b, None).turns == 1


def test_delete_during_turn_fails_commit(store_factory):
    listener = RecordingListener()
    store = store_factory(listener=listener)
    sid = store.create(None).id
    with store.turn(sid, None, "hi") as t:
        store.delete(sid, None)
        with pytest.raises(SessionNotFound):
            t.commit("too late")
    with pytest.raises(SessionNotFound):
        store.get(sid, None)
    assert listener.events == [("evict", "deleted", 1)] and store.stats().sessions == 0


def test_concurrent_turns_on_one_session_lose_nothing(store_factory):
    store = store_factory(HistoryPolicy(0, 0, 0, 0))
    sid = store.create("k", system="sys").id
    threads_n, turns_n = 8, 25
    barrier = threading.Barrier(threads_n)
    seen, errors = [], []

    def worker(tid):
        try:
            barrier.wait()
            for i in range(turns_n):
                with store.turn(sid, "k", f"u{tid}.{i}", timeout=60) as t:
                    seen.append((t.index, len(t.prompt)))
                    result = t.commit(f"a{tid}.{i}")
                    assert result.turn == t.index
        except Exception as err:  # surfaced below: a thread's assertion must fail the test
            errors.append(err)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to expose races
    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    total = threads_n * turns_n
    snap = store.get(sid, "k")
    assert snap.turns == total and len(snap.messages) == 2 * total
    for user, reply in zip(snap.messages[::2], snap.messages[1::2]):
        assert user["role"] == "user" and reply["role"] == "assistant"
        assert reply["content"] == "a" + user["content"][1:]
    assert {m["content"] for m in snap.messages[::2]} == {f"u{t}.{i}" for t in range(threads_n) for i in range(turns_n)}
    # each turn saw every earlier turn: system + 2 per previous turn + its own message
    assert sorted(seen) == [(n, 2 + 2 * (n - 1)) for n in range(1, total + 1)]


# -- expiry, eviction, stats --------------------------------------------------------------------------

@pytest.mark.parametrize("access", ["get", "turn", "delete", "sweep", "stats", "create"])
def test_ttl_expiry(store_factory, access):
    clock, listener = FakeClock(), RecordingListener()
    store = store_factory(HistoryPolicy(5, 0, 100, 0), clock=clock, listener=listener)
    sid = store.create("k").id
    clock.advance(99.5)
    assert store.get(sid, "k").turns == 0  # reading does not count as activity
    clock.advance(0.5)
    if access == "sweep":
        assert store.sweep() == 1
    elif access == "stats":
        assert store.stats().sessions == 0
    elif access == "create":
        store.create("k")
        assert store.stats().sessions == 1
    else:
        call = {"get": lambda: store.get(sid, "k"), "turn": lambda: store.turn(sid, "k", "hi"),
                "delete": lambda: store.delete(sid, "k")}[access]
        with pytest.raises(SessionNotFound):
            call()
    assert listener.events == [("evict", "ttl", 1)]
    with pytest.raises(SessionNotFound):
        store.get(sid, "k")
    assert store.sweep() == 0


def test_commit_refreshes_ttl_and_busy_session_is_not_swept(store_factory):
    clock = FakeClock()
    store = store_factory(HistoryPolicy(5, 0, 100, 0), clock=clock)
    sid = store.create(None).id
    clock.advance(90)
    chat(store, sid, 1)
    clock.advance(90)  # 180 s after creation, 90 s after the commit
    with store.turn(sid, None, "slow generation") as t:
        clock.advance(500)
        assert store.sweep() == 0 and store.stats().sessions == 1
        t.commit("finally")
    clock.advance(99)
    assert store.get(sid, None).turns == 2
    clock.advance(1)
    assert store.sweep() == 1


def test_lru_evicts_least_recently_active_never_busy(store_factory):
    clock, listener = FakeClock(), RecordingListener()
    store = store_factory(HistoryPolicy(5, 0, 0, 3), clock=clock, listener=listener)
    ids = []
    for _ in range(3):
        ids.append(store.create(None).id)
        clock.advance(1)
    chat(store, ids[0], 1)  # a is now the most recently active: b is the LRU
    clock.advance(1)
    with store.turn(ids[1], None, "busy"):  # ...but b has a turn in progress: c goes instead
        d = store.create(None).id
        clock.advance(1)
    alive = {sid for sid in ids + [d] if _exists(store, sid)}
    assert alive == {ids[0], ids[1], d}
    assert listener.events == [("evict", "lru", 1)]
    e = store.create(None).id
    assert {sid for sid in ids + [d, e] if _exists(store, sid)} == {ids[0], d, e}


def test_lru_over_bound_only_while_all_others_busy(store_factory):
    store = store_factory(HistoryPolicy(5, 0, 0, 1))
    a = store.create(None).id
    with store.turn(a, None, "busy"):
        b = store.create(None).id
        assert _exists(store, a) and _exists(store, b)
    c = store.create(None).id
    assert [_exists(store, s) for s in (a, b, c)] == [False, False, True]


def _exists(store, sid):
    try:
        store.get(sid, None)
        return True
    except SessionNotFound:
        return False


def test_stats_match_sessions(store_factory):
    clock = FakeClock()
    store = store_factory(HistoryPolicy(4, 0, 50, 0), clock=clock)

    def expected(snaps):
        return StoreStats(len(snaps), sum(len(s.messages) for s in snaps),
                          max((len(s.messages) for s in snaps), default=0), max((s.tokens for s in snaps), default=0))

    assert store.stats() == expected([])
    rng = random.Random(7)
    ids = [store.create(None, system=rng.choice([None, "sys prompt"])).id for _ in range(12)]
    for sid in ids:
        chat(store, sid, rng.randint(0, 7), size=rng.randint(1, 9))
    store.delete(ids[0], None)
    live = [store.get(sid, None) for sid in ids[1:]]
    assert len({s.tokens for s in live}) > 3 and len({len(s.messages) for s in live}) > 2
    assert store.stats() == expected(live)
    clock.advance(49)
    chat(store, ids[1], 1)
    clock.advance(1)  # everything but ids[1] expires lazily at stats()
    assert store.stats() == expected([store.get(ids[1], None)])


# -- construction -------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["memory", "memory://"])
def test_make_store_memory(url):
    assert isinstance(make_store(POLICY, count_words, url=url), MemoryStore)


@pytest.mark.parametrize("url", ["postgresql://u:hunter2@localhost/db", "sqlite://relative/x.db",
                                 "sqlite:///tmp/x.db?mode=ro", "redis://:hunter2@127.0.0.1:1/0", "bogus", ""])
def test_make_store_unknown_backend_names_setting(url):
    """Unknown schemes, malformed SQLite URLs and an unreachable Redis: ValueError naming the setting."""
    with pytest.raises(ValueError) as err:
        make_store(POLICY, count_words, url=url)
    assert "session_store" in str(err.value) and "hunter2" not in str(err.value)


@pytest.mark.parametrize("field, value", [("max_turns", -1), ("max_tokens", 1.5), ("ttl_s", -1),
                                          ("ttl_s", float("nan")), ("max_sessions", True)])
def test_policy_rejects_bad_values(field, value):
    kwargs = dict(max_turns=5, max_tokens=0, ttl_s=0, max_sessions=0)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        HistoryPolicy(**kwargs)


def test_closed_store_refuses(store_factory):
    store = store_factory()
    sid = store.create(None).id
    store.close()
    with pytest.raises(RuntimeError):
        store.get(sid, None)
