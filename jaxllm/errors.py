"""The one exception type for user mistakes: bad config, bad data, bad checkpoint."""

import sys
from collections.abc import Callable


class UserError(ValueError):
    """A mistake the user can fix. Its message names the key or file, what was found and what is allowed.

    Command-line entry points print the message as one line and exit with status 2.
    """


def exit_status(run: Callable[[], object]) -> int:
    """A command-line entry point's exit status: 0 when `run()` returns, 2 when it raises a UserError,
    whose message is printed as one `error:` line on stderr."""
    try:
        run()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
