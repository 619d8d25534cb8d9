"""Exceptions for user mistakes, shared by the whole project.

The CLI catches :class:`UserError` and prints ``repsearch: error: <message>`` on one line, then
exits with status 2. Messages are therefore a single line (no newline characters).
"""


class UserError(Exception):
    """A user mistake (bad recipe, missing data, wrong option); the message is one line."""


class DataError(UserError):
    """A user-fixable data problem: missing root or layout, subset or split larger than the data."""
