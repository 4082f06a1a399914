"""``python -m omniid``: the command line (serve, run, train)."""
import sys

from .cli.main import main

sys.exit(main())
