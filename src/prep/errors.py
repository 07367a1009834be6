"""Exceptions of the data-preparation tools. Messages name the file or value and the problem."""


class PrepError(Exception):
    """A source, download, output folder or cloud step failed in an expected way; the CLI prints one line.

    Whatever raised it left the previous dataset as it was.
    """
