"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into a single line on stderr and exit code 2, with no
traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""
