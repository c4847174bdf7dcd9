"""The one exception type that means "the user can fix this"."""


class UserError(Exception):
    """Bad configuration or bad data: the CLI prints the message as one paragraph and exits 2.

    The message names the offending file or key and says how to fix it. Anything else that escapes
    a stage is a bug in rst-mart and exits 1 with a traceback.
    """
