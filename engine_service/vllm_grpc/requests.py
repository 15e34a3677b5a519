"""``vllm.grpc.engine.GenerateRequest`` -> what our engine runs: prompt ids, ``SamplingParams``, stop strings.

Every field the engine does not support is refused with a ``FieldError`` naming it (INVALID_ARGUMENT), never
ignored: a gateway that sends a ``structural_tag`` must not get an unconstrained sample back as if it had
worked. The other structured-output constraints (json_schema, regex, grammar, json_object, choice) map onto
ours; ``grammar_from_first_token`` starts the constraint at the first token even where the prompt leaves
Qwen3 thinking open. The rest is copied into our own engine proto and judged by the EngineService's validation
(``generate_request.generate_inputs``: limits, ``n``, ``truncate_prompt_tokens``, ``logit_bias``, the length
rule), so both front doors accept and refuse the same things.

proto3 has no presence on most of SMG's sampling fields: 0 means "unset" for ``top_p``, ``top_k`` and
``repetition_penalty`` (vLLM's own servicer reads them the same way), so those map to our defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine_service.generate_request import generate_inputs
from engine_service.limits import RequestLimits, check_request_id
from engine_service.protocol import EngineInfo
from engine_service.sampling_params import MAX_LOGPROBS, MAX_PROMPT_LOGPROBS, SamplingParams
from qwen3serve.engine.v1 import engine_pb2
from qwen3serve.smg import vllm_engine_pb2 as pb
from service_common.validation import FieldError
from tokenizer_service.config import RequestLimits as TextLimits
from tokenizer_service.limits import check_stop_strings

#: Stop strings are held to the tokenizer service's limits (count and UTF-8 size of each).
STOP_LIMITS = TextLimits()


@dataclass(frozen=True)
class EngineRequest:
    """One translated Generate call."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]  # stop strings, matched on the detokenized output (engine_service.vllm_grpc.stops)
    skip_special_tokens: bool  # how the output is detokenized for stop-string matching
    stream: bool


def _refuse(field: str, what: str) -> FieldError:
    return FieldError(field, f"{what} is not supported by this engine")


def check_supported(request: pb.GenerateRequest) -> None:
    """FieldError for the first field set that the engine cannot honour."""
    sp = request.sampling_params
    if request.WhichOneof("input") == "text":
        raise FieldError("text", "this engine takes token ids (tokenized.input_ids); text input is not supported")
    for name in ("mm_inputs", "media_refs", "kv_transfer_params"):
        if request.HasField(name):
            raise _refuse(name, "multimodal input or KV transfer")
    if len(request.extra_mm_inputs):
        raise _refuse("extra_mm_inputs", "multimodal input")
    if request.HasField("kv_transfer_params_json"):
        raise _refuse("kv_transfer_params_json", "KV transfer (prefill/decode disaggregation)")
    if request.HasField("data_parallel_rank") and request.data_parallel_rank != 0:
        raise FieldError(
            "data_parallel_rank", f"this engine has one data-parallel rank (0), got {request.data_parallel_rank}"
        )
    if sp.WhichOneof("constraint") == "structural_tag":
        raise _refuse("sampling_params.structural_tag", "structural_tag (use json_schema, regex, grammar or choice)")
    if sp.HasField("prompt_logprobs") and not 0 <= sp.prompt_logprobs <= MAX_PROMPT_LOGPROBS:
        raise FieldError(
            "sampling_params.prompt_logprobs",
            f"must be in [0, {MAX_PROMPT_LOGPROBS}] (-1, every token's, is not supported), got {sp.prompt_logprobs}",
        )
    if sp.HasField("logprobs") and not 0 <= sp.logprobs <= MAX_LOGPROBS:
        raise FieldError("sampling_params.logprobs", f"must be in [0, {MAX_LOGPROBS}], got {sp.logprobs}")
    bad = next((t for t in sp.logit_bias if t < 0), None)
    if bad is not None:
        raise FieldError(f"sampling_params.logit_bias[{bad}]", "token ids are >= 0")
    if sp.HasField("truncate_prompt_tokens") and sp.truncate_prompt_tokens < -1:
        raise FieldError(
            "sampling_params.truncate_prompt_tokens",
            f"must be -1 (the model's length) or >= 1, got {sp.truncate_prompt_tokens}",
        )


def _ours(request: pb.GenerateRequest, info: EngineInfo) -> engine_pb2.GenerateRequest:
    """The same request in our engine proto, so that ``generate_inputs`` (the EngineService's validation:
    limits first, truncation, the length rule) judges both front doors alike."""
    sp = request.sampling_params
    ours = engine_pb2.GenerateRequest(prompt_token_ids=request.tokenized.input_ids)
    o = ours.sampling_params
    if sp.n:  # no presence: 0 is "unset" (one sample)
        o.n = sp.n
    # fields with presence in SMG's message
    for name in ("temperature", "seed", "logprobs", "max_tokens", "prompt_logprobs"):
        if sp.HasField(name):
            setattr(o, name, getattr(sp, name))
    # No presence in SMG's message: 0 is "unset" (vLLM's servicer reads them so), which our defaults mean too.
    for name in (
        "top_p",
        "top_k",
        "repetition_penalty",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "min_tokens",
    ):
        if getattr(sp, name):
            setattr(o, name, getattr(sp, name))
    o.stop_token_ids.extend(sp.stop_token_ids)
    o.ignore_eos = sp.ignore_eos
    o.logit_bias.update(sp.logit_bias)
    constraint = sp.WhichOneof("constraint")  # same names and meanings as ours; structural_tag was refused
    if constraint == "choice":
        o.choice.choices.extend(sp.choice.choices)
    elif constraint is not None:
        setattr(o, constraint, getattr(sp, constraint))
    if sp.HasField("truncate_prompt_tokens"):
        # vLLM's -1: as much as the model takes, which here leaves room for one generated token
        keep = sp.truncate_prompt_tokens
        o.truncate_prompt_tokens = info.max_model_len - 1 if keep == -1 else max(keep, 0)
    return ours


def prompt_field(exc: FieldError) -> FieldError:
    """An engine FieldError about the prompt, named as SMG's requests name it (``tokenized.input_ids``)."""
    if exc.field.startswith("prompt_token_ids"):
        return FieldError("tokenized.input_ids" + exc.field[len("prompt_token_ids") :], exc.message)
    return exc


def engine_request(request: pb.GenerateRequest, info: EngineInfo, limits: RequestLimits) -> EngineRequest:
    """The engine's form of ``request``. Raises FieldError with the field's path in SMG's GenerateRequest."""
    check_request_id(request.request_id, limits)
    if not request.request_id:
        raise FieldError("request_id", "must not be empty (Abort names requests by it)")
    check_supported(request)
    sp = request.sampling_params
    stops = tuple(sp.stop)
    check_stop_strings(stops, STOP_LIMITS, "sampling_params.stop")
    try:
        prompt, params = generate_inputs(_ours(request, info), info, limits)  # validates, EngineInfo's rules too
        if params.constraint is not None and sp.grammar_from_first_token:
            params = replace(params, constraint=replace(params.constraint, from_first_token=True))
    except FieldError as exc:
        if exc.field.startswith("prompt_token_ids"):
            raise prompt_field(exc) from None
        raise exc if exc.field.startswith("sampling_params") else exc.within("sampling_params") from None
    return EngineRequest(request.request_id, prompt, params, stops, sp.skip_special_tokens, request.stream)
