"""A ``GenerateRequest`` as the engine takes it: the prompt's token ids and a ``SamplingParams``, validated.

Counts are checked against ``RequestLimits`` before any per-item work, so an oversized field costs O(1);
every error is a ``FieldError`` with its path in the request (``sampling_params.logit_bias[5]``). Torch-free.
"""

from __future__ import annotations

from engine_service.constraints import ConstraintKind, OutputConstraint
from engine_service.limits import RequestLimits, check_constraint_size
from engine_service.protocol import EngineInfo, check_lengths
from engine_service.sampling_params import SamplingParams
from qwen3serve.engine.v1 import engine_pb2
from service_common.validation import FieldError, check_count

# Optional scalar fields of the SamplingParams message that map 1:1 onto SamplingParams.
_OPTIONAL_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "n",
)


def generate_inputs(
    request: engine_pb2.GenerateRequest, info: EngineInfo, limits: RequestLimits
) -> tuple[list[int], SamplingParams]:
    """The request's prompt (after ``truncate_prompt_tokens``) and its ``SamplingParams``; FieldError with the
    proto path on a bad field. The length rule applies to the truncated prompt.

    This is the service boundary's one validation of a request (both servicers call it): limits, the proto's
    fields, then ``EngineInfo.validate`` (length rule, token ids against the vocabulary). ``AsyncEngine`` does not
    validate again; the engine core re-checks on admission only as its own guard (``LLMEngine.add_request``)."""
    msg = request.sampling_params
    _check_counts(msg, limits)
    num_prompt_tokens = len(request.prompt_token_ids)
    if msg.HasField("truncate_prompt_tokens"):
        keep = msg.truncate_prompt_tokens
        if keep < 1:
            raise FieldError("sampling_params.truncate_prompt_tokens", f"must be >= 1, got {keep}")
        num_prompt_tokens = min(num_prompt_tokens, keep)
    kwargs: dict[str, object] = {
        name: getattr(msg, name)
        for name in _OPTIONAL_FIELDS
        if msg.HasField(name)  # type: ignore[arg-type]  # names from the descriptor, not the stub's Literal
    }
    try:
        kwargs["max_tokens"] = check_lengths(
            num_prompt_tokens, msg.max_tokens if msg.HasField("max_tokens") else None, info.max_model_len
        )
        params = SamplingParams(
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            logit_bias=tuple(msg.logit_bias.items()),
            allowed_token_ids=tuple(msg.allowed_token_ids) or None,
            bad_words=tuple(tuple(word.token_ids) for word in msg.bad_words),
            constraint=output_constraint(msg, limits),
            **kwargs,  # type: ignore[arg-type]  # checked by SamplingParams itself
        )
    except FieldError as exc:
        raise request_path(exc) from None
    # Copied only now: a prompt over the length rule is refused without touching its ids (a 2M-id list costs the
    # event loop tens of milliseconds); slicing the repeated field copies the kept ids alone.
    prompt = list(request.prompt_token_ids[len(request.prompt_token_ids) - num_prompt_tokens :])
    try:
        info.validate(prompt, params)
    except FieldError as exc:
        raise request_path(exc) from None
    return prompt, params


def _check_counts(msg: engine_pb2.SamplingParams, limits: RequestLimits) -> None:
    if msg.HasField("n") and msg.n > limits.max_n:
        raise FieldError("sampling_params.n", f"is {msg.n}; the limit is {limits.max_n} samples per request (--max-n)")
    check_count("sampling_params.stop_token_ids", len(msg.stop_token_ids), limits.max_stop_token_ids, "ids")
    check_count("sampling_params.logit_bias", len(msg.logit_bias), limits.max_logit_bias, "entries")
    check_count("sampling_params.allowed_token_ids", len(msg.allowed_token_ids), limits.max_allowed_token_ids, "ids")
    check_count("sampling_params.bad_words", len(msg.bad_words), limits.max_bad_words, "sequences")
    for i, word in enumerate(msg.bad_words):
        check_count(f"sampling_params.bad_words[{i}]", len(word.token_ids), limits.max_bad_word_tokens, "ids")


def output_constraint(msg: object, limits: RequestLimits, from_first_token: bool = False) -> OutputConstraint | None:
    """The ``constraint`` oneof of a SamplingParams message (ours, or SMG's: same names) as an
    ``OutputConstraint``, its size checked first; None when unset (or ``json_object: false``). FieldErrors name
    the field under SamplingParams (``json_schema``); the caller adds the message's own path."""
    which = msg.WhichOneof("constraint")  # type: ignore[attr-defined]
    if which is None or (which == "json_object" and not msg.json_object):  # type: ignore[attr-defined]
        return None
    try:
        kind = ConstraintKind(which)
    except ValueError:
        raise FieldError(which, "is not a supported structured-output constraint") from None
    if kind is ConstraintKind.CHOICE:
        choices = msg.choice.choices  # type: ignore[attr-defined]
        check_constraint_size("choice.choices", len(choices), sum(len(c.encode()) for c in choices), limits)
        return OutputConstraint(kind, choices=tuple(choices), from_first_token=from_first_token)
    spec = "" if kind is ConstraintKind.JSON_OBJECT else getattr(msg, which)
    check_constraint_size(which, 0, len(spec.encode("utf-8", "surrogatepass")), limits)
    return OutputConstraint(kind, spec, from_first_token=from_first_token)


def request_path(exc: FieldError) -> FieldError:
    """An engine-side FieldError with its path in GenerateRequest: the engine names the prompt's field or a
    ``SamplingParams`` field, and the latter sit under ``sampling_params`` in the proto."""
    return exc if exc.field.startswith("prompt_token_ids") else exc.within("sampling_params")
