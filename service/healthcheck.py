"""The container healthcheck: ``python -m service.healthcheck`` exits 0 when this machine's service is ready.

It asks ``/readyz`` on 127.0.0.1 at the port the service itself listens on (``GRU_PORT``, read through the same
Settings), so a container started on another port stays healthy. urllib, not curl: slim images have none; and
never through a proxy that the container's environment names (HTTP_PROXY): no proxy reaches its loopback.
"""

from __future__ import annotations

import sys
import urllib.request

from service.config import Settings

TIMEOUT_SECONDS = 2.0  # below the HEALTHCHECK's --timeout=3s, so a stalled service counts as a failure
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy, whatever the environment


def main() -> int:
    url = f"http://127.0.0.1:{Settings().port}/readyz"
    try:
        with _DIRECT.open(url, timeout=TIMEOUT_SECONDS) as answer:
            status = answer.status
    except OSError as exc:  # refused, timed out, or an HTTP error status (HTTPError)
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
