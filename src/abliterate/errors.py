"""The one exception type the CLI turns into a one-line message."""


class AbliterateError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or fail with one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise AbliterateError(
            f"{purpose} needs the '{module.split('.')[0]}' package; pip install 'abliterate[{extra}]'"
        ) from None
