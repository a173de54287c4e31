"""The error a user of ``conveyor train``/``sample``/``eval`` can cause: the command prints its message on
one line (a traceback only with ``--debug``)."""


class UsageError(Exception):
    """A bad flag, file or checkpoint; the message starts with the flag's name."""
