"""`python -m llavakit` is the `llavakit` command."""

import sys

from .cli import main

sys.exit(main())
