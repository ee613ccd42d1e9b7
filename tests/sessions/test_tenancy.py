"""One key cannot evict another's sessions, in every store; each key sees only its own figures."""
from __future__ import annotations

from daemon.sessions import HistoryPolicy, StoreStats

from support.fakes import FakeClock, count_words
from test_sessions import RecordingListener, chat, store_factory  # noqa: F401 - a fixture

A, B, C = "owner-a", "owner-b", "owner-c"


def alive(store, ids, owner) -> set[str]:
    out = set()
    for sid in ids:
        try:
            store.get(sid, owner)
            out.add(sid)
        except LookupError:
            pass
    return out


def test_one_key_creating_many_sessions_evicts_only_its_own(store_factory):
    clock, listener = FakeClock(), RecordingListener()
    store = store_factory(HistoryPolicy(5, 0, 0, max_sessions=10, max_sessions_per_key=4),
                          clock=clock, listener=listener)
    mine = []
    for _ in range(3):
        mine.append(store.create(A).id)
        clock.advance(1)
    theirs = []
    for _ in range(50):  # the flood: B at its quota loses its own oldest, never A's
        theirs.append(store.create(B).id)
        clock.advance(1)
    assert alive(store, mine, A) == set(mine)
    assert alive(store, theirs, B) == set(theirs[-4:])
    assert listener.total("evict", "quota") == 46 and listener.total("evict", "lru") == 0


def test_a_full_store_evicts_from_the_key_holding_the_most(store_factory):
    clock, listener = FakeClock(), RecordingListener()
    store = store_factory(HistoryPolicy(5, 0, 0, max_sessions=6, max_sessions_per_key=5),
                          clock=clock, listener=listener)
    a = [store.create(A).id for _ in range(1)]
    clock.advance(1)
    b = []
    for _ in range(5):
        b.append(store.create(B).id)
        clock.advance(1)
    c = store.create(C).id  # 7 > 6: B holds most, its least recently active goes (not A's older one)
    assert alive(store, a, A) == set(a) and alive(store, [c], C) == {c}
    assert alive(store, b, B) == set(b[1:])
    assert listener.total("evict", "lru") == 1 and listener.total("evict", "quota") == 0


def test_a_busy_session_is_never_evicted_for_a_quota(store_factory):
    store = store_factory(HistoryPolicy(5, 0, 0, max_sessions=10, max_sessions_per_key=1),
                          clock=FakeClock())
    first = store.create(A).id
    with store.turn(first, A, "hi") as turn:
        second = store.create(A).id  # over quota, but the only other session is in a turn
        turn.commit("hello")
    assert alive(store, [first, second], A) == {first, second}


def test_owner_stats_count_only_the_owners_sessions(store_factory):
    store = store_factory(HistoryPolicy(5, 0, 0, max_sessions=100), clock=FakeClock())
    a = store.create(A).id
    chat(store, a, 2, owner=A)
    b = store.create(B).id
    chat(store, b, 4, owner=B, size=3)
    assert store.owner_stats(A) == StoreStats(1, 4, 4, store.get(a, A).tokens)
    assert store.owner_stats(B) == StoreStats(1, 8, 8, store.get(b, B).tokens)
    assert store.owner_stats(C) == StoreStats(0, 0, 0, 0)
    assert store.stats().sessions == 2
    store.delete(b, B)
    assert store.owner_stats(B) == StoreStats(0, 0, 0, 0)


def test_redis_data_of_the_previous_schema_is_indexed_by_owner(redis_server):
    from daemon.sessions import make_store
    redis_server.client().flushdb()
    policy = HistoryPolicy(5, 0, 0, max_sessions=100, max_sessions_per_key=2)
    store = make_store(policy, count_words, url=redis_server.url, clock=FakeClock())
    ids = [store.create(A).id for _ in range(2)]
    store.close()
    client = redis_server.client()  # back to schema 1: no owner index
    for key in client.keys("edgechat:owner*") + ["edgechat:sessions:owner"]:
        client.delete(key)
    client.set("edgechat:schema_version", 1)
    store = make_store(policy, count_words, url=redis_server.url, clock=FakeClock(2e6))
    try:
        assert client.get("edgechat:schema_version") == "2"
        assert store.owner_stats(A).sessions == 2
        newest = store.create(A).id  # the quota now sees the migrated sessions
        assert len(alive(store, ids + [newest], A)) == 2
    finally:
        store.close()
