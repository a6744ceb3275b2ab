"""The one exception type for user mistakes (bad flags, malformed files, missing fields)."""


class UserError(Exception):
    """A mistake the user can fix. Entry points print its message as one line and exit with status 2.

    The message must name what to fix: the flag, or the file and line, or the task and field.
    """
