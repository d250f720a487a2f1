"""The one exception type for bad input.

A `UsageError` carries a single line that says what is wrong and what to do. Entry points
(train.py, eval.py, ``python -m streamgen.prompts``) print it and exit with status 2 before
any process is started; library code raises it wherever it first sees the bad value.
"""


class UsageError(Exception):
    """Bad input from the user: the message is one line, the exit status is 2."""


EXIT_USAGE = 2
