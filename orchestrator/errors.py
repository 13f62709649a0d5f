"""The one exception type for user errors; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input from a user: a spec, an argument, a file. The message says what to do."""
