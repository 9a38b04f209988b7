"""For tests and `uffdsnap bench` only, never the snapshot path: building their helper
programs from helpers/ in a source checkout (build.py)."""
