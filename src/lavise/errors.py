"""The one exception type for problems with what the user gave us."""


class LaviseError(Exception):
    """Bad input: the message names the file or argument and says how to fix it.

    The command line prints it without a traceback and exits with status 2.
    """
