"""Errors whose message is meant for the user of the service."""


class InputError(ValueError):
    """Bad user input: the message says what was wrong with it, and is shown as the prediction's error."""
