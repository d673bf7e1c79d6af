"""python -m service.client stream ...: see service.client.cli."""

import sys

from service.client.cli import main

sys.exit(main())
