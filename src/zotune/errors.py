"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into a single line on stderr and exit code 2, with no
traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or say which extra installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the {module.split('.')[0]} package, which is not installed; "
                        f"pip install 'zotune[{extra}]'") from None
