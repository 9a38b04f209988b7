"""Errors that end a command with one clear line on stderr and a non-zero exit."""


class UserError(Exception):
    """Bad input or an impossible request: the message is the whole story, one line."""

    exit_code = 2


class ProtocolError(Exception):
    """A message that breaks the wire protocol (uffdsnap.protocol); the connection must be
    dropped."""


class SnapshotFailed(Exception):
    """A snapshot could not be completed or proven consistent; nothing was published."""

    exit_code = 1
