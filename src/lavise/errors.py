"""What lavise raises and warns about when the user's input is the problem."""


class LaviseError(Exception):
    """Bad input: the message names the file or argument and says how to fix it.

    The command line prints it without a traceback and exits with status 2.
    """


class LaviseWarning(UserWarning):
    """Something in the data was skipped; the message says what and how many."""
