"""Live charts that receive only what is new: a Streamlit component (components v2) around plotly.js.

`st.plotly_chart` re-sends and re-draws the whole figure on every refresh, so a refresh costs more as the path
grows and the browser spends its time redrawing points it already had (issue 10: Chromium at 1.3 cores, the page
showing 17% of the engine's steps). Here the server keeps, per chart and browser session, what it sent last and
compares the new figure with it, trace by trace:

- a trace whose data arrays (x, y, z, text, marker colours ...) only grew and whose other settings did not change
  is *extended*: only the new points go to the browser, which appends them (`Plotly.extendTraces`);
- a small trace that changed in place (the "current point" marker) is *restyled* with its few values;
- anything else (a new walk or branch, a refit PCA basis, an event line in the layout, a chart switched on) is a
  *full* draw (`Plotly.react`, which keeps the user's zoom through `uirevision`).

Messages are numbered; the browser applies a delta only on top of the message it was built on, and asks for a
full draw otherwise (a reload, a view it had not shown, a message it never got), so a chart never shows a gap.
The chart builders (charts.py) stay pure figure functions shared with the static views and exports.

plotly.js is the copy the installed `plotly` package ships, served by this app's own server (Streamlit's static
file serving, `app/static/`), so nothing is fetched from elsewhere at run time.
"""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import plotly
import plotly.graph_objects as go
import streamlit as st

from app.charts import column_values, few_steps

STATIC = Path(__file__).resolve().parent / "static"
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
# Data arrays a trace can grow along (dotted paths into a trace's JSON); everything else is its settings.
GROWING = ("x", "y", "z", "text", "hovertext", "customdata", "marker.color", "marker.size")
SMALL_TRACE = 64  # a trace this short that changed in place is re-sent whole instead of redrawing the chart
MAX_POINTS = 5000  # per trace, drawn; longer paths are thinned for drawing only (thin_for_drawing)
_STATIC_LOCK = threading.Lock()

_JS = r"""
function loadPlotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!window.__geodesicPlotly) {
    window.__geodesicPlotly = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = new URL("app/static/plotly.min.js", window.location.href).href;
      script.onload = () => resolve(window.Plotly);
      script.onerror = () => { window.__geodesicPlotly = null; reject(new Error("plotly.js did not load")); };
      document.head.appendChild(script);
    });
  }
  return window.__geodesicPlotly;
}

function apply(Plotly, div, data, setStateValue) {
  const state = div.__geodesic || (div.__geodesic = { seq: null, points: 0, draws: 0 });
  if (data.seq === state.seq) return;  // the same message again (a rerun that changed nothing)
  if (data.full) {
    Plotly.react(div, data.full.data, data.full.layout, data.config);
    state.seq = data.seq;
  } else if (state.seq === null || data.base !== state.seq) {
    setStateValue("want_full", `${data.seq}:${state.seq}`);  // a message is missing here: ask for everything
    return;
  } else {
    const groups = {};
    for (const op of data.ops) {
      if (op.op === "restyle") {
        const update = {};
        for (const [k, v] of Object.entries(op.update)) update[k] = [v];
        Plotly.restyle(div, update, [op.trace]);
        continue;
      }
      const keys = Object.keys(op.update).sort().join(",");
      (groups[keys] = groups[keys] || []).push(op);
    }
    for (const ops of Object.values(groups)) {
      const update = {};
      for (const k of Object.keys(ops[0].update)) update[k] = ops.map((op) => op.update[k]);
      Plotly.extendTraces(div, update, ops.map((op) => op.trace));
    }
    state.seq = data.seq;
  }
  state.points = (div.data || []).reduce((n, t) => n + ((t.x && t.x.length) || 0), 0);
  state.draws += 1;
  div.dataset.seq = String(state.seq);
  div.dataset.draws = String(state.draws);  // updates applied: the benchmarks count refreshes with it
  div.dataset.points = String(state.points);  // read by the browser tests
}

// A chart out of sight (scrolled away, or its tab in the background) draws nothing: its messages wait and are
// drawn when it comes back into view. Each update redraws a whole plotly chart (about 15 ms of the browser's main
// thread per chart here), and the second chart of a page is usually below the fold.
const MAX_PENDING = 100;  // more than this waiting (half a minute): drop them and ask for a full draw instead

function inView(div) {
  return div.__inView !== false && document.visibilityState !== "hidden";
}

function draw(div, data) {
  div.__queue = (div.__queue || Promise.resolve())
    .then(() => loadPlotly())
    .then((Plotly) => apply(Plotly, div, data, div.__setStateValue))
    .catch((err) => {
      console.error("geodesic live chart:", err);
      const state = div.__geodesic;
      if (state && state.seq !== null && !data.full) {  // an update that did not apply: redraw from scratch
        state.seq = null;
        div.__setStateValue("want_full", `${data.seq}:error`);
      } else {
        div.textContent = `The chart could not be drawn: ${err}`;
      }
    });
}

function flush(div) {
  const pending = div.__pending || [];
  div.__pending = [];
  div.dataset.pending = "0";
  for (const data of pending) draw(div, data);  // a gap (dropped messages) makes apply() ask for a full draw
}

function watch(div) {
  if (div.__observer) return;
  div.__observer = new IntersectionObserver((entries) => {
    const was = inView(div);
    div.__inView = entries[entries.length - 1].isIntersecting;
    if (!was && inView(div)) flush(div);
  }, { rootMargin: "200px" });
  div.__observer.observe(div);
  if (!window.__geodesicVisibility) {
    window.__geodesicVisibility = true;
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "hidden") return;
      for (const chart of document.querySelectorAll(".geodesic-live-chart")) if (inView(chart)) flush(chart);
    });
  }
}

export default function (component) {
  const { data, parentElement, setStateValue } = component;
  let div = parentElement.querySelector(".geodesic-live-chart");
  if (!div) {
    div = document.createElement("div");
    div.className = "geodesic-live-chart";
    parentElement.appendChild(div);
  }
  div.__setStateValue = setStateValue;
  watch(div);
  if (!data) return;
  if (inView(div) && !(div.__pending && div.__pending.length)) {
    draw(div, data);
    return;
  }
  const pending = div.__pending || (div.__pending = []);
  if (data.full) pending.length = 0;  // a full draw replaces everything before it
  pending.push(data);
  if (pending.length > MAX_PENDING) pending.splice(0, pending.length - 1);
  div.dataset.pending = String(pending.length);  // read by the browser tests
  if (inView(div)) flush(div);
}
"""

_COMPONENT = st.components.v2.component("geodesic.live_chart", html="", css=".geodesic-live-chart{width:100%}",
                                        js=_JS, isolate_styles=False)


_STATIC_READY = threading.Event()  # set once the file is in place: every later refresh skips the check


def ensure_plotly_js() -> None:
    """Put the installed plotly package's plotly.min.js where this app's server serves static files."""
    if _STATIC_READY.is_set():
        return
    target = STATIC / "plotly.min.js"
    with _STATIC_LOCK:
        if target.is_file() and target.stat().st_size == PLOTLY_JS.stat().st_size:
            _STATIC_READY.set()
            return
        STATIC.mkdir(exist_ok=True)
        tmp = target.with_name(f"plotly.min.js.{os.getpid()}.tmp")
        shutil.copyfile(PLOTLY_JS, tmp)
        os.replace(tmp, target)
        _STATIC_READY.set()


# -- what changed between two figures (pure: no Streamlit) ----------------------------------------------------
def _array(value) -> np.ndarray | None:
    """A 1-D data array from a figure's JSON: a list, or plotly's typed array {"dtype", "bdata"} (base64)."""
    if isinstance(value, list):
        return np.asarray(value, dtype=object)
    if isinstance(value, dict) and set(value) == {"dtype", "bdata"}:  # no "shape": one dimension
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return None


def _plain(value):
    """A figure's JSON with plotly's typed arrays ({"dtype", "bdata", "shape"}) as plain lists: plotly.js keeps a
    typed array as given, and Plotly.extendTraces cannot append to one."""
    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
            if "shape" in value:
                array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
            return array.tolist()
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _split(trace: dict) -> tuple[str, dict[str, np.ndarray]]:
    """(a trace's settings as canonical JSON, its growing data arrays by dotted path)."""
    settings, arrays = json.loads(json.dumps(trace)), {}
    for path in GROWING:
        head, _, tail = path.partition(".")
        holder = settings.get(head) if tail else settings
        key = tail or head
        if isinstance(holder, dict) and (array := _array(holder.get(key))) is not None:
            del holder[key]
            arrays[path] = array
    return json.dumps(settings, sort_keys=True), arrays


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal arrays (NaN equal to NaN); numbers compared in numpy, anything else value by value."""
    if len(a) != len(b):
        return False
    try:
        return bool(np.array_equal(a.astype(float), b.astype(float), equal_nan=True))
    except (TypeError, ValueError):  # strings, nested lists (3-D text, colours by name)
        return all(x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
                   for x, y in zip(a.tolist(), b.tolist(), strict=True))


def figure_update(fig: go.Figure, sent: dict | None, want_full: object = None) -> tuple[dict, dict]:
    """(the message that brings a browser showing `sent` to `fig`, what it will then show).

    sent: this function's second result for the previous message (None: nothing shown yet). want_full: the
    browser's latest request for a full draw (a new value forces one)."""
    as_json = _plain(json.loads(fig.to_json()))
    parts = [_split(trace) for trace in as_json.get("data", [])]
    layout = json.dumps(as_json.get("layout", {}), sort_keys=True)
    seq = (sent["seq"] + 1) if sent else 1
    full = {"seq": seq, "full": {"data": as_json.get("data", []), "layout": as_json.get("layout", {})}}
    memory = {"seq": seq, "layout": layout, "traces": parts, "want_full": want_full, "message": full}
    if (sent is None or want_full != sent["want_full"] or layout != sent["layout"]
            or len(parts) != len(sent["traces"])):
        return full, memory
    ops = []
    for i, ((settings, arrays), (old_settings, old_arrays)) in enumerate(zip(parts, sent["traces"], strict=True)):
        if settings != old_settings or set(arrays) != set(old_arrays):
            return full, memory
        n_old = {len(a) for a in old_arrays.values()}
        grown = all(len(arrays[p]) >= len(old_arrays[p]) and _same(arrays[p][: len(old_arrays[p])], old_arrays[p])
                    for p in arrays)
        if grown and len(n_old) <= 1:
            tail = {p: a[len(old_arrays[p]):].tolist() for p, a in arrays.items()}
            if any(tail.values()):
                ops.append({"op": "extend", "trace": i, "update": tail})
        elif all(len(a) <= SMALL_TRACE for a in arrays.values()):
            if not all(_same(arrays[p], old_arrays[p]) for p in arrays):
                ops.append({"op": "restyle", "trace": i, "update": {p: a.tolist() for p, a in arrays.items()}})
        else:
            return full, memory
    if not ops:  # nothing new: the same message again, which the browser ignores
        return sent["message"], sent
    delta = {"seq": seq, "base": sent["seq"], "ops": ops}
    return delta, {**memory, "message": delta}


def thin_for_drawing(n: int) -> np.ndarray:
    """Indices of the points of an n-point path that are drawn: all of them up to MAX_POINTS, else every k-th
    (k a power of two, so the points kept stay kept as the path grows and the charts can still be extended)."""
    stride = 1
    while n > MAX_POINTS * stride:
        stride *= 2
    return np.arange(0, n, stride)


def runs_signature(runs: list[tuple[str, pd.DataFrame]], extra: object = None) -> tuple:
    """What a chart of `runs` is built from besides the rows themselves: the walks and their columns, the events
    (dotted lines), how the tables were thinned, whether the steps span only a few (charts.few_steps: the step
    axes' ticks), and whatever else the caller passes. While it stays the same, the chart only grows."""
    def events(frame: pd.DataFrame) -> tuple:
        if "event" not in frame:
            return ()
        marked = frame["event"].fillna("") != ""
        return tuple(zip(frame["step"][marked].tolist(), frame["event"][marked].tolist(), strict=True))

    def stride(frame: pd.DataFrame) -> int:
        return int(frame.index[1] - frame.index[0]) if len(frame) > 1 else 1

    return (tuple((label, tuple(f.columns), events(f), stride(f)) for label, f in runs), few_steps(runs), extra)


def _values(rows: pd.DataFrame, src: dict) -> dict:
    """The plotly.js attribute arrays of a trace for these rows of its table (as charts.source names them)."""
    update = {"x": column_values(rows, src["x"]), "y": column_values(rows, src["y"])}
    for attribute, key in (("z", "z"), ("text", "text"), ("marker.color", "color")):
        if src.get(key):
            update[attribute] = column_values(rows, src[key])
    return update


def runs_update(build, runs: list[tuple[str, pd.DataFrame]], signature: tuple, sent: dict | None,
                want_full: object = None, side: dict[str, dict] | None = None) -> tuple[dict, dict]:
    """Like figure_update for a chart of growing tables, without building the figure while only rows are added:
    each trace built by charts.py says where its points come from (`charts.source`), so the new rows of each
    table become the new points of its traces. build() makes the figure when a full draw is needed.

    side: the plotly.js attributes of small traces that change in place rather than grow ({name: {attribute:
    value}}, for the trace whose meta is {"side": name}: a curve measured at the current point); one that changed
    since the last message is restyled, not redrawn with the whole figure."""
    side = {k: _plain(v) for k, v in (side or {}).items()}
    fast = (sent is not None and sent.get("signature") == signature and want_full == sent["want_full"]
            and sent.get("sources") is not None and set(side) == set(sent.get("side", {})))
    if not fast:
        fig = build()
        message, memory = figure_update(fig, None, want_full)
        message["seq"] = memory["seq"] = (sent["seq"] + 1) if sent else 1
        sources, counts, side_at = [], [], {}
        for i, trace in enumerate(fig.data):
            meta = trace.meta if isinstance(trace.meta, dict) else {}
            src = meta.get("src")
            sources.append(src)
            if meta.get("side") in side:
                side_at[meta["side"]] = i
            if src is not None and src.get("last"):
                counts.append(len(runs[src["run"]][1]) - src["start"])
            else:
                counts.append(len(trace.x) if src is not None and trace.x is not None else 0)
        return message, {"seq": message["seq"], "signature": signature, "want_full": want_full, "sources": sources,
                         "counts": counts, "message": message, "side": side, "side_at": side_at}
    ops, counts = [], list(sent["counts"])
    for name, values in side.items():
        if values != sent["side"][name] and name in sent["side_at"]:
            ops.append({"op": "restyle", "trace": sent["side_at"][name], "update": values})
    for i, src in enumerate(sent["sources"]):
        if src is None:
            continue
        frame = runs[src["run"]][1]
        new = frame.iloc[src["start"] + counts[i]:]
        if new.empty:
            continue
        if src.get("last"):  # a marker of the newest point: moved, not extended
            ops.append({"op": "restyle", "trace": i, "update": _values(new.iloc[-1:], src)})
            counts[i] = len(frame) - src["start"]
            continue
        ops.append({"op": "extend", "trace": i, "update": _values(new, src)})
        counts[i] += len(new)
    if not ops:
        return sent["message"], sent
    seq = sent["seq"] + 1
    message = {"seq": seq, "base": sent["seq"], "ops": ops}
    return message, {**sent, "seq": seq, "counts": counts, "message": message, "side": side}


# -- in the app -----------------------------------------------------------------------------------------------
def live_plotly_chart(fig: go.Figure, key: str, config: dict | None = None) -> dict:
    """Draw `fig` under `key`, sending the browser only what changed since this session's last refresh.
    Returns the message sent (tests read it)."""
    return _mount(key, config, lambda sent, want_full: figure_update(fig, sent, want_full))


def live_runs_chart(build, runs: list[tuple[str, pd.DataFrame]], key: str, config: dict | None = None,
                    extra: object = None, side: dict[str, dict] | None = None) -> dict:
    """Draw the chart build() makes from `runs` under `key`; while only rows are added to the tables, send their
    new points without building the figure (extra: anything else the figure depends on; side: small traces that
    change in place, see runs_update)."""
    signature = runs_signature(runs, extra)
    return _mount(key, config, lambda sent, want_full: runs_update(build, runs, signature, sent, want_full, side))


def _mount(key: str, config: dict | None, update) -> dict:
    ensure_plotly_js()
    memory_key = f"_live_chart:{key}"
    want_full = (st.session_state.get(key) or {}).get("want_full")
    message, st.session_state[memory_key] = update(st.session_state.get(memory_key), want_full)
    message = {**message, "config": {"responsive": True, **(config or {})}}
    _COMPONENT(data=message, key=key, default={"want_full": want_full}, on_want_full_change=lambda: None)
    return message
