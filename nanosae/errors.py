"""The one exception a user can cause. The CLI prints its message on one line and exits 2, no traceback."""


class NanosaeError(Exception):
    """A problem with the user's inputs (path, layer, file contents, request); the message names the fix."""
