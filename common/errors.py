"""User-facing errors.

Every error a user can cause (a bad file, a bad config, a spent budget) is a ``UserError``:
its message is one line that says what is wrong, where, and how to fix it. The CLI prints
it without a traceback and exits with code 2.
"""


class UserError(Exception):
    """A problem with the user's input or state, not a bug. Message: one line, actionable."""

    exit_code = 2


class DataError(UserError):
    """A private-text data file (or data set id) cannot be used as given."""


class ConfigError(UserError):
    """A run configuration is invalid."""


class LedgerError(UserError):
    """A privacy ledger file is unreadable or inconsistent."""


class BudgetExceeded(UserError):
    """A request would push a client past its privacy budget; nothing was run or charged."""


class RoundFailed(UserError):
    """A round could not be aggregated (too few valid replies); its state is kept, resume to retry."""
