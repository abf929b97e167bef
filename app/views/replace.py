"""Ask before closing walks with steps not saved (a dialog).

A new walk, Reset, a run reloaded into Explore and a walk started from uploaded weights each close the walks on
screen (the main walk, its branches, a fan). Walks live in the session only until saved on the Runs page, so a
click on any of them threw away a long walk without a word. Now, when some walk on screen has steps taken since it
was made, reloaded or saved, the click asks first, as an editor does before closing a changed file: save them (each
as a run in the store) and go on, go on without saving, or cancel. A walk with nothing new is closed without a
question, and "don't ask again" keeps the session's clicks one click each for someone trying setting after setting.
"""
from __future__ import annotations

import re

import streamlit as st

from app import session
from geodesic.errors import GeodesicError

PENDING = "_replace_pending"  # the action waiting for an answer
NO_ASK = "_replace_no_ask"  # "don't ask again", for the rest of the session
REQUESTED = "_replace_requested"  # the action whose button was clicked (request)
ANSWERED = "_replace_answered"  # the action the user said to go on with
SAID = "_replace_said"  # the runs that answer saved, said once the action is done (say)

_GREEK = {"ε": "eps", "β": "beta", "λ": "lambda", "ρ": "rho", "@": "at"}


def run_name(s, branch) -> str:
    """A name for the branch's run as the Runs page offers one (goal-solver-seed-step), with the branch's label:
    'sparsify-constrained-seed0-step340', 'sparsify-constrained-seed0-eps-0.1-at-200-step340'."""
    base = f"{s.config.goal.kind}-{s.config.walk.solver}-seed{s.config.seed}"
    label = "" if branch.label == "main" else "".join(_GREEK.get(c, c) for c in branch.label)
    label = re.sub(r"[^A-Za-z0-9._]+", "-", label).strip("-.")[:40]
    return f"{base}-{label + '-' if label else ''}step{branch.walker.n_steps}"


def free_name(name: str, root) -> str:
    """`name`, or name-2, name-3…: the first one no run under `root` has."""
    candidate, n = name, 1
    while (root / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def save_under_free_name(save, name: str, root) -> str:
    """Call save(candidate) with `name`, or name-2, name-3…, the first one no run under `root` has; the name it was
    saved under. Pages saving at once may pick the same free name: save_run refuses the second (nothing is
    overwritten) and that page takes the next one."""
    for _ in range(100):
        candidate = free_name(name, root)
        try:
            save(candidate)
            return candidate
        except GeodesicError:
            if not (root / candidate).exists():  # not a name taken meanwhile (a store that cannot be written)
                raise
    raise GeodesicError(f"no free name like {name} in {root}: too many pages saving at once, try again")


def save_unsaved(s) -> list[str]:
    """Save every walk on screen with unsaved steps as a run of its own; the names they were saved under. The walks
    are stopped first (they are about to be closed), so that each is written at one point."""
    from app.views import runs  # (here: the Runs page asks this module before it reloads a run)

    s.runner.pause()
    session.close_fan()
    return [save_under_free_name(lambda name, b=branch: runs.save_branch(s, b, name), run_name(s, branch),
                                 runs.store_root())
            for branch in session.unsaved()]


def _describe(branches) -> str:
    def steps(n: int) -> str:
        return f"{n:,} step{'s' if n != 1 else ''}"

    if len(branches) == 1:
        b = branches[0]
        walk = "The walk on screen" if b.label == "main" else f"The walk {b.label}"
        return f"{walk} has {steps(b.unsaved_steps)} not saved"
    listed = ", ".join(f"{b.label} ({steps(b.unsaved_steps)})" for b in branches)
    return f"{len(branches)} walks on screen have steps not saved: {listed}"


def say() -> None:
    """Say which runs the last answer saved, once: called after the action, or at the top of the run that follows
    it (a toast sent before a st.rerun() never shows)."""
    if st.session_state.get(ANSWERED):  # the action is still to come in this run
        return
    said = st.session_state.pop(SAID, None)
    if said:
        st.toast(f"Saved before closing: {', '.join(said)} (on the Runs page).", icon=":material/save:",
                 duration="long")


def _cancel() -> None:
    st.session_state.pop(PENDING, None)


@st.dialog("Close walks not saved?", on_dismiss=_cancel)  # closing it (×, Esc, a click beside it) is Cancel
def _ask(action: str, what: str) -> None:
    """The question, in a dialog: drawn in the page, it was out of sight whenever the page had been scrolled (the
    sidebar's button stays in view; the top of the page does not). A click here runs this function alone; its
    answer is noted and the whole page run again, where go_ahead acts on it."""
    ss = st.session_state
    at_risk = session.unsaved()
    if at_risk:
        st.warning(f"{_describe(at_risk)}. {what} closes {'it' if len(at_risk) == 1 else 'them'}.")
    no_ask = st.checkbox("Don't ask again in this session", key="replace_no_ask_box")
    c1, c2, c3 = st.columns([3, 4, 2])
    save = c1.button("Save and go on", type="primary", disabled=not at_risk,
                     help="Each walk with new steps is saved in the run store under the name the Runs page offers "
                          "(goal-solver-seed-step), then closed")
    drop = c2.button("Go on without saving")
    if c3.button("Cancel"):
        _cancel()
        st.rerun()
    if not (save or drop):
        return
    if save and at_risk:
        try:
            names = save_unsaved(session.state())
        except GeodesicError as err:  # the store cannot be written: nothing is closed
            st.error(f"Not saved, so nothing was closed (the walks are paused): {err}")
            return
        ss[SAID] = names
    ss.pop(PENDING, None)
    ss[ANSWERED] = action
    if no_ask:
        ss[NO_ASK] = True
    st.rerun()


def request(action: str) -> None:
    """A button's on_click: the user asked for `action`. Noted in a callback, which runs before the page does (as
    Run and Pause are): read from the button's value, 2 clicks in about 15 were lost in Chromium with a fan walking,
    no question and no new walk, most likely in a run a live refresh's rerun cut short."""
    st.session_state[REQUESTED] = action


def requested(action: str) -> bool:
    return st.session_state.get(REQUESTED) == action


def drop(action: str) -> None:
    """Forget a request that will not be carried out (its settings were refused, its run is gone)."""
    if requested(action):
        st.session_state.pop(REQUESTED)


def would_ask() -> bool:
    """Whether closing the walks on screen asks first (some are not saved, and the user did not say not to ask)."""
    return bool(session.unsaved()) and not st.session_state.get(NO_ASK)


def go_ahead(action: str, what: str) -> bool:
    """True when `action` (asked for by its button, now or earlier and answered now) may close the walks on screen:
    nothing on screen is unsaved, the user asked not to be asked, or they answered "go on" (saving or not).
    Otherwise, with walks not saved, the question is asked and False returned."""
    ss = st.session_state
    if ss.get(ANSWERED) == action:
        ss.pop(ANSWERED)
        return True
    if requested(action):
        ss.pop(REQUESTED)
        if not would_ask():
            ss.pop(PENDING, None)
            return True
        ss[PENDING] = action
    if ss.get(PENDING) == action:
        _ask(action, what)
    return False
