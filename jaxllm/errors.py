"""The one exception type for user mistakes: bad config, bad data, bad checkpoint."""


class UserError(ValueError):
    """A mistake the user can fix. Its message names the key or file, what was found and what is allowed.

    Command-line entry points print the message as one line and exit with status 2.
    """
