"""`python -m uffdsnap` is the same as the `uffdsnap` command."""

import sys

from uffdsnap.cli import main

sys.exit(main())
