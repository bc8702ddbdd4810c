"""The exceptions gptpar raises. Each message names the offending value and the rule it broke."""


class GptparError(Exception):
    """Base class of every gptpar error."""


class GptparConfigError(GptparError, ValueError):
    """A configuration that cannot work, detected at construction (before any compute or communication)."""


class CollectiveTimeoutError(GptparError, TimeoutError):
    """A collective did not complete in time: a peer is missing, stuck, or issued a different collective."""
