"""``python -m afconvert ...``: the same as the ``afconvert`` command."""
import sys

from afconvert.cli import main

sys.exit(main())
