"""The Explore or the Runs page, chosen by ?page= (AppTest runs one script; the app's router picks pages by URL).

A file rather than AppTest.from_function: the baselines' analysis process is spawned, and a spawned process
runs the main script's top level again, which a from_function script cannot survive (its arguments are gone);
here that top level does nothing in such a process."""
import streamlit as st

from app.views import explore, runs

if __name__ != "__mp_main__":
    explore.setup_sidebar()
    (runs.render if st.query_params.get("page") == "runs" else explore.render)()
