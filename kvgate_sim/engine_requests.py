"""SIMULATOR: parsing and validating the engine's OpenAI-shaped request bodies, with vLLM 0.32's error answers.

Every client mistake raises :class:`SimError` (a 4xx with an OpenAI-style JSON error); the server sends it.
"""

from __future__ import annotations

from typing import Any

from kvgate.asgi import ClientDisconnected, Request, openai_error
from kvgate_sim.tokenizer import Tokenizer

MAX_BODY = 64 * 1024 * 1024


class SimError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None):
        # Client text quoted in a message may hold lone surrogates (valid JSON, not encodable UTF-8): escape them
        # so the error body can always be sent.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict[str, Any]:
        return openai_error(self.message, self.type, self.status, self.param)


def bad(message: str, param: str | None = None) -> SimError:
    """A 400 ``BadRequestError``."""
    return SimError(400, message, "BadRequestError", param)


async def read_body(request: Request) -> dict[str, Any]:
    """The JSON object body (at most :data:`MAX_BODY` bytes)."""
    try:
        body = await request.json(limit=MAX_BODY)
    except ValueError as e:
        raise bad(f"Invalid JSON body: {e}") from None
    except ClientDisconnected:
        raise
    except Exception as e:  # BodyTooLarge
        raise bad(str(e)) from None
    if not isinstance(body, dict):
        raise bad("Request body must be a JSON object")
    return body


def check_model(body: dict[str, Any], model_name: str) -> None:
    """404 for a ``model`` other than the served one (absent: the served one)."""
    model = body.get("model")
    if model is not None and model != model_name:
        raise SimError(
            404, f"The model `{model}` does not exist. Valid aliases: {model_name}.", "NotFoundError", "model"
        )


def int_param(body: dict[str, Any], name: str, default: int | None) -> int | None:
    """A positive integer parameter (``default`` when absent or null)."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer", name)
    if v < 1:
        raise bad(f"{name} must be at least 1, got {v}.", name)
    return int(v)


def stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(``include_usage``, ``continuous_usage_stats``); only allowed with ``stream: true``."""
    opts = body.get("stream_options")
    if opts is None:
        return False, False
    if not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options")
    if not body.get("stream"):
        raise bad("Stream options can only be defined when `stream=True`.", "stream_options")
    return bool(opts.get("include_usage")), bool(opts.get("continuous_usage_stats"))


def parse_token_ids(v: Any, param: str, max_token_id: int) -> list[int]:
    """A list of in-vocabulary token ids (``0 <= id < max_token_id``)."""
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise bad(f"{param} must be a list of token ids", param)
    if any(t < 0 or t >= max_token_id for t in v):
        raise bad(f"{param} contains out-of-vocabulary token ids", param)
    return v


def parse_prompt(prompt: Any, tokenizer: Tokenizer, max_token_id: int) -> list[int]:
    """A completions ``prompt`` as token ids: a string, a list of ids, or a batch of exactly one of those."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        ids = parse_token_ids(prompt, "prompt", max_token_id)
    else:
        raise bad(
            "prompt must be a string or a list of token ids (batches are not supported by the simulator)", "prompt"
        )
    if not ids:
        raise bad("The prompt cannot be empty.", "prompt")
    return ids


def check_len(n_prompt: int, max_tokens: int, max_model_len: int) -> None:
    """vLLM's context-length errors: the prompt alone, or prompt + ``max_tokens``, too long."""
    if n_prompt >= max_model_len:
        raise bad(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {n_prompt} input tokens. Please reduce the length of the input messages.",
            "messages",
        )
    if n_prompt + max_tokens > max_model_len:
        raise bad(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {max_model_len} tokens and your request has {n_prompt} input "
            f"tokens ({max_tokens} > {max_model_len} - {n_prompt}).",
            "max_tokens",
        )
