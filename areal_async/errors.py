"""Errors in what the user gave: a file, a line of it, a key, a folder. The command line prints the message in one
line and exits with 2; a traceback is for bugs."""


class InputError(ValueError):
    """A bad input the user can fix; the message names the file (and line), the key or the folder."""
