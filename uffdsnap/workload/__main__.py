"""`python -m uffdsnap.workload`: one Python writer of the workload (the native writer's CLI)."""

import sys

from uffdsnap.workload import main

sys.exit(main())
