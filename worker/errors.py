"""Errors the engine raises for bad input; each carries a message a user can act on."""
from __future__ import annotations


class OpenLoRAError(Exception):
    """Base class of every error OpenLoRA raises on purpose."""


class InvalidRequestError(OpenLoRAError, ValueError):
    """The request itself is wrong (parameters, prompt, ids)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context."""


class UnknownAdapterError(InvalidRequestError, KeyError):
    """A request names an adapter the engine does not hold."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class AdapterError(OpenLoRAError, ValueError):
    """An adapter cannot be used: bad files, unsafe format, or shapes that do not match the base model."""
