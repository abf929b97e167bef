"""Which browser tab a session is: a token kept in the tab's sessionStorage, so a reload of the tab (a new
Streamlit session, with an empty st.session_state) can take back the walk it had (session.keep_tab).

sessionStorage, not a cookie or the URL: it belongs to one tab and survives its reloads, while a link copied to
another browser (a teacher's, shared with a class) or a second tab opened from it starts with none. A tab that
was duplicated copies it; the session that finds its token held by an open page asks for a new one (`renew`).
"""
from __future__ import annotations

import streamlit as st

KEY = "geodesic_tab"  # the component's key; its value is {"token": ...}

# getRandomValues, not randomUUID: a class reaches the server over plain http on a LAN, which is not a secure
# context, and randomUUID exists only in secure ones. Storage blocked (some privacy settings): no token, no restore.
_JS = r"""
export default function (component) {
  const { data, setStateValue } = component;
  const NAME = "geodesic-tab";
  let token = null;
  try {
    token = window.sessionStorage.getItem(NAME);
    if (!token || (data && data.renew && data.renew === token)) {
      const bytes = new Uint8Array(16);
      window.crypto.getRandomValues(bytes);
      token = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
      window.sessionStorage.setItem(NAME, token);
    }
  } catch (err) {
    return;
  }
  if (!data || data.have !== token) setStateValue("token", token);
}
"""

# The element takes no room: its container is hidden (its script still runs when it mounts). The newline tells
# Streamlit this is CSS, not a file path (the brackets read as a glob otherwise).
_CSS = 'div[data-testid="stElementContainer"]:has(.geodesic-tab) {\n  display: none;\n}\n'
_COMPONENT = st.components.v2.component("geodesic.tab", html='<span class="geodesic-tab"></span>', css=_CSS,
                                        js=_JS, isolate_styles=False)


def token(have: str | None, renew: str | None = None) -> str | None:
    """This tab's token, once its page has reported it (None on a session's first run, and where scripts or
    storage are blocked). have: the token this session already knows (the page reports only a different one);
    renew: a token to replace (a duplicated tab's)."""
    result = _COMPONENT(data={"have": have, "renew": renew}, key=KEY, default={"token": None},
                        on_token_change=lambda: None)
    value = result.get("token") if result is not None else None
    # what the page made: 32 hex digits (anything else, e.g. a value sent by hand, is no token)
    return value if isinstance(value, str) and len(value) == 32 and set(value) <= set("0123456789abcdef") else None
