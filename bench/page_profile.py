"""Where a page's browser time goes while its walk runs: Chromium's own sampling profiler (DevTools protocol,
`Profiler` domain) on one page of `streamlit run` for --seconds, self time summed by function and by script.

Usage: python bench/page_profile.py [--query goal=new-task] [--seconds 8] [--top 20]

Prints the share of the page's main thread that was idle, in native work ("(program)": style, layout, paint),
and in each script (plotly.min.js, React, Streamlit's bundles). The compositor and raster threads and the GPU
process are not sampled: `bench/dashboard_speed.py` reports Chromium's CPU use as a whole.
"""
from __future__ import annotations

import argparse
import collections
import json
import time

from browser import app_server, chromium, open_page


def profile_page(query: str, seconds: float, port: int) -> dict:
    with app_server(port) as (url, _), chromium() as context:
        page, _ = open_page(context, f"{url}/?{query}" if query else url)
        cdp = context.new_cdp_session(page)
        cdp.send("Profiler.enable")
        cdp.send("Profiler.setSamplingInterval", {"interval": 500})  # µs
        page.get_by_role("button", name="Run", exact=True).click()
        time.sleep(3)  # past the first refreshes and the baselines' start
        cdp.send("Profiler.start")
        time.sleep(seconds)
        profile = cdp.send("Profiler.stop")["profile"]
        pause = page.get_by_role("button", name="Pause", exact=True)
        if pause.is_visible():
            pause.click()
    nodes = {n["id"]: n["callFrame"] for n in profile["nodes"]}
    by_function, by_script = collections.Counter(), collections.Counter()
    for node, delta in zip(profile["samples"], profile["timeDeltas"], strict=True):
        frame = nodes[node]
        script = frame["url"].rsplit("/", 1)[-1] or frame["functionName"] or "(native)"
        by_function[(frame["functionName"] or "(anonymous)", script)] += delta
        by_script[script] += delta
    total = sum(by_script.values()) or 1
    return {"query": query, "seconds": seconds, "sampled_ms": round(total / 1000, 1),
            "by_script": {k: round(v / total, 3) for k, v in by_script.most_common(12)},
            "by_function": [(f"{fn} ({script})", round(v / total, 3))
                            for (fn, script), v in by_function.most_common(25)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query", default="goal=new-task&steps=1000000", help="URL query of the walk the page runs")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--port", type=int, default=8623)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    result = profile_page(args.query, args.seconds, args.port)
    functions = result.pop("by_function")[: args.top]
    print(json.dumps(result, ensure_ascii=False))
    for name, share in functions:
        print(f"{100 * share:5.1f}%  {name}")


if __name__ == "__main__":
    main()
