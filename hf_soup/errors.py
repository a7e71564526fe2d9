"""The one exception type hf_soup raises for bad input."""


class SoupError(ValueError):
    """A bad input: the message says what was received, what is allowed and how to fix it.

    It is a `ValueError`, so callers that catch `ValueError` keep working; the CLI turns it into one line on stderr
    and exit code 2.
    """


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of a library's error message (cut to `limit` characters), to quote inside a one-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def brief(value: object, limit: int = 80) -> str:
    """A short one-line repr of `value` to quote untrusted input in an error message: long strings, lists and
    mappings are cut, deep nesting is elided (`reprlib`), and the whole is at most `limit` characters."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: object, choices) -> str:
    """`" (did you mean 'x'?)"` when `word` is a string close to one of `choices` (a typo), else `""`."""
    import difflib

    if not isinstance(word, str):
        return ""
    choices = [choice for choice in choices if isinstance(choice, str)]
    folded = {choice.lower(): choice for choice in choices}
    close = [folded[word.lower()]] if word.lower() in folded else difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
