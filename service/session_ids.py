"""The session id rule, in one place for the service and its client (this module imports nothing heavy).

1 to 128 of ``[A-Za-z0-9._:-]``, but not ``.`` or ``..``: clients normalise those path segments away, so
such a session could never be reached (``curl .../v1/sessions/../predict`` is a stateless call, and an HTTP
client posts it to ``/v1/predict``). The pattern has no look-ahead, which pydantic-core's regex engine
lacks: an id starts with a non-dot, or with ``.`` and a non-dot, or with ``..``.
"""

from __future__ import annotations

import re

SESSION_ID_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ : -, other than . and .."
SESSION_ID_PATTERN = (r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}"
                      r"|\.\.[A-Za-z0-9._:-]{1,126})$")
SESSION_ID = re.compile(SESSION_ID_PATTERN)  # use fullmatch: Python's $ also matches before a final "\n"
