"""Error type raised by strategy adapters and their registry."""


class StrategyAdapterError(ValueError):
    """A strategy adapter cannot be found, built, or applied to this model or schedule."""
