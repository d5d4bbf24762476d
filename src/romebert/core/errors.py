"""One exception type for every user-facing failure.

The CLI prints ``romebert: error: <message>`` on one line for these and exits with status 2, so a
message must name the file / field / line and the problem, and never need a stack trace to be read.
"""


class RomebertError(Exception):
    """A user-facing error (bad input file, unknown task, mismatched checkpoint, ...)."""
