"""``FieldError``: the one way any layer (engine core, servicers, configs) says "this field of the request is wrong".

It carries the field's path (``sampling_params.top_p``, ``messages[2].content``) apart from the message, so the
servicers never parse a field name out of exception text: ``service_common.errors`` maps it to INVALID_ARGUMENT with a
``google.rpc.BadRequest`` detail naming ``field``. It is a ``ValueError``, so code that validates plain Python values
(``SamplingParams(...)``, the offline ``LLM``) raises the exception Python users expect. Torch-free and grpc-free.
"""

from __future__ import annotations

import re


class FieldError(ValueError):
    """``field`` (a path into the request) is invalid; ``message`` says why, without repeating the path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type[FieldError], tuple[str, str]]:
        # Rebuilt from (field, message), not from ``args`` (the joined text): the engine process sends these
        # across its pipe (protocol.RequestFailed), and the default rebuild, FieldError(text), raised there.
        return FieldError, (self.field, self.message)

    def within(self, prefix: str) -> FieldError:
        """The same error, its path nested under ``prefix`` (``"sampling_params"`` + ``"top_p"``)."""
        return FieldError(f"{prefix}.{self.field}" if prefix else self.field, self.message)


def check_count(field: str, count: int, limit: int, what: str = "items") -> None:
    """Raise FieldError if ``count`` exceeds ``limit`` (checked before any per-item work)."""
    if count > limit:
        raise FieldError(field, f"has {count} {what}; the limit is {limit}")


# xgrammar's errors start with a timestamp and a C++ source location, and some with its CHECK's text.
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def grammar_compiler_message(exc: BaseException) -> str:
    """An xgrammar error's own words (a bad schema, regex or grammar), without the timestamp and C++ source
    location it starts with: what both services quote back in an INVALID_ARGUMENT."""
    return _XGRAMMAR_LOCATION.sub("", str(exc).strip())
