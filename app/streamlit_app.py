"""geodesic dashboard: a router only. Views live in app/views/, one idea each."""
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `streamlit run app/streamlit_app.py` from anywhere

from app import session  # noqa: E402
from app.views import explore, learn, replace, runs  # noqa: E402

# The tab's icon is a file of ours: a Material icon there is fetched from fonts.gstatic.com, which offline
# machines (and classrooms behind a firewall) cannot reach. The navigation's icons come with Streamlit's own font.
FAVICON = Path(__file__).resolve().parents[1] / "assets" / "favicon.png"
st.set_page_config(page_title="geodesic", page_icon=str(FAVICON), layout="wide")
pages = [st.Page(explore.render, title="Explore", icon=":material/explore:", url_path="explore", default=True),
         st.Page(runs.render, title="Runs", icon=":material/folder_open:", url_path="runs"),
         st.Page(learn.render, title="Learn", icon=":material/school:", url_path="learn")]
navigation = st.navigation(pages)
# After a reload, the tab's walk comes back, with its view, teach mode (a link's ?teach=1 is gone from the URL
# once the user has moved to another page, and a reload there showed a student the whole set-up) and "don't ask
# again" before closing unsaved walks.
session.follow_tab(explore.VIEW_KEYS + ("_teach", replace.NO_ASK))
explore.setup_sidebar()  # every page: the set-up controls and their state live in the sidebar
navigation.run()
