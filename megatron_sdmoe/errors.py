"""The one error type users see: bad input (config, data, checkpoint, parallel layout).

Entry points print its message as a single line and exit with code 2.
"""

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix."""
