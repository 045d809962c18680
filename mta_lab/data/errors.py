"""Bad data input (files, fields, encodings, sizes): reported to the user as one line, exit code 2."""


class DataError(Exception):
    """A data input cannot be used. The message names the file (or corpus) and the problem."""
