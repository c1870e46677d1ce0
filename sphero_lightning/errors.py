"""The one exception type for user errors."""


class SpheroError(ValueError):
    """A problem with the user's input or settings: reported as one line naming the fix, no traceback."""
