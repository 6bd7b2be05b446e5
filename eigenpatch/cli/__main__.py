"""``python -m eigenpatch.cli COMMAND ...`` (what ``eigenpatch serve`` tests start)."""

import sys

from eigenpatch.cli import main

sys.exit(main())
