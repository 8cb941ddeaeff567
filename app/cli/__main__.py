"""`python -m app.cli`: the `sgjobs` command."""

import sys

from app.cli import main

sys.exit(main())
