"""The one exception type the CLI turns into a one-line message."""


class AbliterateError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""
