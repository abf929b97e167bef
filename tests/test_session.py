"""The registry that gives a reloaded tab its walk back (app/session.py: keep_tab, follow_tab), apart from a browser:
Streamlit's runtime, the pages and the clock are stand-ins. The browser test reloads real tabs."""
import threading
import types

import pytest

from app import session


@pytest.fixture
def registry(monkeypatch):
    """An empty registry; pages open or closed as the test says; a clock the test moves."""
    import streamlit.runtime

    pages, clock = set(), [1000.0]
    monkeypatch.setattr(session, "_KEPT", {})
    monkeypatch.setattr(session, "_page_open", lambda sid: sid in pages)
    monkeypatch.setattr(session, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(streamlit.runtime.Runtime, "exists", classmethod(lambda cls: True))
    monkeypatch.setattr(session, "_start_forgetting", lambda keep: None)
    settings = types.SimpleNamespace(keep_closed_seconds=60.0)
    monkeypatch.setattr(session, "engine", lambda: types.SimpleNamespace(settings=settings))
    return types.SimpleNamespace(pages=pages, clock=clock, settings=settings)


def test_a_closed_page_s_state_is_kept_for_keep_closed_seconds_then_dropped(registry):
    kept = session._KEPT
    kept["open"] = session._Kept(session.AppState(), "s1", {})
    kept["closed"] = session._Kept(session.AppState(), "s2", {})
    registry.pages.add("s1")
    session._forget_closed_pages(60)  # s2's page is found closed now
    registry.clock[0] += 59
    session._forget_closed_pages(60)
    assert set(kept) == {"open", "closed"}
    registry.clock[0] += 2
    session._forget_closed_pages(60)
    assert set(kept) == {"open"}  # an open page's state stays however long
    registry.pages.discard("s1")
    session._forget_closed_pages(60)
    registry.clock[0] += 61
    session._forget_closed_pages(60)
    assert kept == {}


def test_sessions_registering_reloading_and_duplicating_at_once(registry, monkeypatch):
    """32 tabs, each on its own thread as Streamlit runs sessions: each registers its state, then half of them are
    reloaded (the old page closed, a new session with the same token) and take their own state back, while the
    other half are duplicated (a new session with the token of a page still open) and are told to renew."""
    local = threading.local()
    monkeypatch.setattr(session, "state", lambda: local.state)
    monkeypatch.setattr(session, "session_id", lambda: local.sid)
    adopted: dict[str, object] = {}
    monkeypatch.setattr(session, "_adopt", lambda restored, me, views: adopted.__setitem__(me, restored))
    n = 32
    states = [session.AppState() for _ in range(n)]
    registry.pages.update(f"old{i}" for i in range(n))
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(n)

    def tab(i: int) -> None:
        local.state, local.sid = states[i], f"old{i}"
        barrier.wait()
        outcomes[f"old{i}"] = session.keep_tab(f"token{i}", {"view": "Path"})
        barrier.wait()
        if i % 2 == 0:  # reloaded: the old page has gone
            registry.pages.discard(f"old{i}")
        barrier.wait()
        local.state, local.sid = session.AppState(), f"new{i}"
        registry.pages.add(f"new{i}")
        outcomes[f"new{i}"] = session.keep_tab(f"token{i}", {})

    threads = [threading.Thread(target=tab, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(outcomes[f"old{i}"] is None for i in range(n))  # registered
    for i in range(n):
        if i % 2 == 0:
            assert outcomes[f"new{i}"] == "restored" and adopted[f"new{i}"] is states[i]
            assert session._KEPT[f"token{i}"].session == f"new{i}"
        else:
            assert outcomes[f"new{i}"] == "renew" and f"new{i}" not in adopted
            assert session._KEPT[f"token{i}"].session == f"old{i}"  # the open tab keeps its walk


def test_no_registry_outside_a_server_or_when_switched_off(registry, monkeypatch):
    import streamlit.runtime

    registry.settings.keep_closed_seconds = 0
    assert session.keep_tab("token", {}) is None and session._KEPT == {}
    registry.settings.keep_closed_seconds = 60
    monkeypatch.setattr(streamlit.runtime.Runtime, "exists", classmethod(lambda cls: False))
    assert session.keep_tab("token", {}) is None and session._KEPT == {}


class _Handle:
    """A stand-in for geodesic.engine.WalkHandle: running, with `left` steps left in its run."""

    def __init__(self, left: int):
        self.left, self.running, self.is_closed, self.ran = left, True, False, []
        self.walker = types.SimpleNamespace(is_done=False)

    @property
    def is_running(self) -> bool:
        return self.running

    @property
    def steps_left(self):
        return self.left if self.running else None

    def pause(self, wait: bool = True) -> None:
        self.running = False

    def run(self, n_steps=None) -> None:
        self.ran.append(n_steps)
        self.running = True


def test_a_closed_page_s_running_walks_pause_and_the_page_that_takes_them_back_resumes_them(registry, monkeypatch):
    """A walk left running by a closed page held a share of the engine until idle_seconds (two minutes); it now
    pauses CLOSED_PAUSE_SECONDS after, and the reloaded tab runs it again for the steps its run had left."""
    monkeypatch.setattr(session, "_adopt", lambda restored, me, views: None)
    monkeypatch.setattr(session, "session_id", lambda: "new")
    main, fan_walk, quick = _Handle(40), _Handle(7), _Handle(3)
    state = session.AppState(runner=main, fan=[(1, fan_walk)])
    session._KEPT["tab"] = session._Kept(state, "old", {})
    session._KEPT["back soon"] = session._Kept(session.AppState(runner=quick), "old2", {})
    session._forget_closed_pages(60)  # both pages found closed
    registry.clock[0] += session.CLOSED_PAUSE_SECONDS - 1
    registry.pages.add("old2")  # that page came back (a network blip): its walk never pauses
    session._forget_closed_pages(60)
    assert main.running and fan_walk.running and quick.running
    registry.clock[0] += 2
    session._forget_closed_pages(60)
    assert not main.running and not fan_walk.running and quick.running
    registry.pages.add("new")
    assert session.keep_tab("tab", {}) == "restored"
    assert (main.ran, fan_walk.ran, quick.ran) == ([40], [7], [])
    assert main.running and fan_walk.running and session._KEPT["tab"].resume == []
