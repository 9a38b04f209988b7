"""Test hooks: deliberately wrong or restricted behaviours that tests switch on to prove the
checker catches them, to pause at a phase, or to exercise a fallback path. Never set in normal
use. A process running in a subprocess reads them as JSON from $UFFDSNAP_TEST_HOOKS, which its
own children (agents) inherit.

Coordinator: `pause_in` (a phase), `no_protect`, `scan_delay_s`. Agent: `no_fault_channel`
(faults and un-protects on the main connection, as an agent without a native core would).
"""

from __future__ import annotations

import json
import os
from typing import Any

TEST_HOOKS_ENV = "UFFDSNAP_TEST_HOOKS"


def hooks_from_environment() -> dict[str, Any]:
    raw = os.environ.get(TEST_HOOKS_ENV)
    return json.loads(raw) if raw else {}
