"""The one exception type hf_soup raises for bad input."""


class SoupError(ValueError):
    """A bad input: the message says what was received, what is allowed and how to fix it.

    It is a `ValueError`, so callers that catch `ValueError` keep working; the CLI turns it into one line on stderr
    and exit code 2.
    """
