"""python -m service.client stream ...: see service.client.cli. Without the ``client`` extra it says so in one
line and exits 2 (httpx: the package itself does, as it is imported first; matplotlib: ``--plot`` does)."""

import sys

from service.client.cli import main

sys.exit(main())
