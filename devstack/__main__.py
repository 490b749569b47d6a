"""`make run`: `python -m devstack`."""

import sys

from devstack.stack import main

sys.exit(main())
