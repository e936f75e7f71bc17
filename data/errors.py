"""The one exception of the data package."""


class DatasetError(Exception):
    """A dataset file is missing, truncated, corrupt, tampered with, or cannot be downloaded.

    The message is always one line that names the file and says what is wrong, so that
    ``run.py`` can print it as is and exit with status 2.
    """

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the cause said
