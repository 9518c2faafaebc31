"""unit: the small library behind train.py / evaluate.py (UNIT T1w <-> T2w translation)."""


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file): the message is one sentence naming what
    and what to do; the scripts print it as `error: ...` and exit with `status` (2; a failed write,
    unit.io.WriteError, 1)."""
    status = 2
