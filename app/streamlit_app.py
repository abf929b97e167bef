"""geodesic dashboard: a router only. Views live in app/views/, one idea each."""
import os
import sys
from pathlib import Path

import streamlit as st
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `streamlit run app/streamlit_app.py` from anywhere

from app.views import explore, learn, runs  # noqa: E402


def _torch_threads() -> int:
    """PyTorch's thread pool is shared by every session of this server. Half the cores by default
    (GEODESIC_TORCH_THREADS overrides): the walks here are small, and on a laptop or a 2-core machine the
    browser drawing the charts needs a core of its own (measured: bench/dashboard_speed.py, BENCHMARKS.md)."""
    default = max(1, (os.cpu_count() or 2) // 2)
    given = os.environ.get("GEODESIC_TORCH_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    if given:
        print(f"GEODESIC_TORCH_THREADS={given!r} is not a positive integer; using {default}", file=sys.stderr)
    return default


_threads = _torch_threads()
if torch.get_num_threads() != _threads:
    torch.set_num_threads(_threads)

st.set_page_config(page_title="geodesic", page_icon=":material/explore:", layout="wide")
pages = [st.Page(explore.render, title="Explore", icon=":material/explore:", url_path="explore", default=True),
         st.Page(runs.render, title="Runs", icon=":material/folder_open:", url_path="runs"),
         st.Page(learn.render, title="Learn", icon=":material/school:", url_path="learn")]
navigation = st.navigation(pages)
explore.setup_sidebar()  # every page: the set-up controls and their state live in the sidebar
navigation.run()
