"""The one error type of local tokenization: the caller skips local routing, never fails the request."""

from __future__ import annotations


class TokenizationError(ValueError):
    """Input the local tokenizer cannot turn into the engine's exact ids (bad messages, template error,
    unsupported content parts, missing files). The message never contains prompt text."""
