"""A request's structured-output constraint, as the engine takes it: what the output must match. Torch-free.

Compiled by the engine core (``engine_service.core.structured_output``, xgrammar); here only its shape is
checked. Sizes are limited by the service before anything is built (``RequestLimits.max_constraint_bytes``,
``max_choices``), so nothing here costs more than a pass over the text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from service_common.validation import FieldError


class ConstraintKind(enum.Enum):
    """The field of the engine proto's ``constraint`` oneof (and of SMG's) each kind comes from."""

    JSON_SCHEMA = "json_schema"  # spec: the schema's JSON text
    REGEX = "regex"  # spec: a regular expression the whole output matches
    GRAMMAR = "grammar"  # spec: EBNF in xgrammar's syntax, with a `root` rule
    JSON_OBJECT = "json_object"  # spec: empty; any JSON object
    CHOICE = "choice"  # choices: the output is exactly one of them


@dataclass(frozen=True)
class OutputConstraint:
    """What the generated text must match. ``from_first_token``: the constraint applies from the first
    generated token even where the prompt leaves Qwen3 thinking open (SMG's ``grammar_from_first_token``);
    otherwise it starts after the model's ``</think>`` there. Invalid shapes raise ``FieldError`` naming the
    kind's field (``json_schema``); what only a compiler can judge is judged by the engine core."""

    kind: ConstraintKind
    spec: str = ""
    choices: tuple[str, ...] = ()
    from_first_token: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ConstraintKind):
            raise FieldError("constraint", f"must be a ConstraintKind, got {self.kind!r}")
        name = self.kind.value
        if not isinstance(self.spec, str):
            raise FieldError(name, f"must be a string, got {type(self.spec).__name__}")
        if self.kind is ConstraintKind.CHOICE:
            if isinstance(self.choices, str) or not self.choices:  # type: ignore[unreachable]  # a caller's str
                raise FieldError("choice.choices", "must list at least one string")
            object.__setattr__(self, "choices", tuple(self.choices))
            bad = next((i for i, c in enumerate(self.choices) if not isinstance(c, str) or not c), None)
            if bad is not None:
                raise FieldError(f"choice.choices[{bad}]", "must be a non-empty string")
        elif self.kind is not ConstraintKind.JSON_OBJECT and not self.spec.strip():
            raise FieldError(name, "must not be empty")

    @property
    def field(self) -> str:
        """The field a compiler's complaint about this constraint names (``json_schema``, ``choice.choices``)."""
        return "choice.choices" if self.kind is ConstraintKind.CHOICE else self.kind.value

    @property
    def size_bytes(self) -> int:
        """UTF-8 bytes of its text (the schema, regex or grammar, or all choices together)."""
        return sum(len(s.encode("utf-8", "surrogatepass")) for s in (self.spec, *self.choices))
