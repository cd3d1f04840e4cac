"""In-process tokenization that gives exactly the engine's token ids (see docs/local-routing.md)."""

from kvgate.tokenization.chat_template import ChatTemplate, detect_content_format, normalize_messages
from kvgate.tokenization.errors import TokenizationError
from kvgate.tokenization.local import DEFAULT_THREAD_THRESHOLD, LocalTokenizer

__all__ = [
    "DEFAULT_THREAD_THRESHOLD",
    "ChatTemplate",
    "LocalTokenizer",
    "TokenizationError",
    "detect_content_format",
    "normalize_messages",
]
