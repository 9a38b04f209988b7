"""uffdsnap: consistent point-in-time snapshots of live multi-process shared memory."""

__version__ = "0.1.0"
