"""``vllm.grpc.engine.GenerateRequest`` -> what our engine runs: prompt ids, ``SamplingParams``, stop strings.

Every field the engine does not support is refused with a ``FieldError`` naming it (INVALID_ARGUMENT), never
ignored: a gateway that sends ``n: 4`` or a JSON schema must not get one unconstrained sample back as if it
had worked. The checks of the engine's own servicer are reused (``check_request_id``, ``check_lengths``,
``SamplingParams``' own validation); only the proto's shape differs.

proto3 has no presence on most of SMG's sampling fields: 0 means "unset" for ``top_p``, ``top_k`` and
``repetition_penalty`` (vLLM's own servicer reads them the same way), so those map to our defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine_service.limits import RequestLimits, check_request_id
from engine_service.protocol import EngineInfo, check_lengths
from engine_service.sampling_params import MAX_LOGPROBS, SamplingParams
from qwen3serve.smg import vllm_engine_pb2 as pb
from service_common.validation import FieldError, check_count
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
    stop: tuple[str, ...]            # stop strings, matched on the detokenized output (engine_service.vllm_grpc.stops)
    skip_special_tokens: bool        # how the output is detokenized for stop-string matching
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
        raise FieldError("data_parallel_rank", f"this engine has one data-parallel rank (0), got "
                                               f"{request.data_parallel_rank}")
    if sp.n > 1:
        raise FieldError("sampling_params.n", f"one sample per request is supported, got n={sp.n}")
    if (constraint := sp.WhichOneof("constraint")) is not None:
        raise _refuse(f"sampling_params.{constraint}", "structured output (constrained decoding)")
    if len(sp.logit_bias):
        raise _refuse("sampling_params.logit_bias", "logit_bias")
    if sp.HasField("prompt_logprobs"):
        raise _refuse("sampling_params.prompt_logprobs", "prompt_logprobs")
    if sp.HasField("truncate_prompt_tokens"):
        raise _refuse("sampling_params.truncate_prompt_tokens", "prompt truncation")
    if sp.HasField("logprobs") and not 0 <= sp.logprobs <= MAX_LOGPROBS:
        raise FieldError("sampling_params.logprobs", f"must be in [0, {MAX_LOGPROBS}], got {sp.logprobs}")


def engine_request(request: pb.GenerateRequest, info: EngineInfo, limits: RequestLimits) -> EngineRequest:
    """The engine's form of ``request``. Raises FieldError with the field's path in GenerateRequest."""
    check_request_id(request.request_id, limits)
    if not request.request_id:
        raise FieldError("request_id", "must not be empty (Abort names requests by it)")
    check_supported(request)
    sp = request.sampling_params
    prompt = list(request.tokenized.input_ids)
    check_count("sampling_params.stop_token_ids", len(sp.stop_token_ids), limits.max_stop_token_ids, "ids")
    stops = tuple(sp.stop)
    check_stop_strings(stops, STOP_LIMITS, "sampling_params.stop")
    try:
        kwargs: dict[str, object] = {
            "max_tokens": check_lengths(len(prompt), sp.max_tokens if sp.HasField("max_tokens") else None,
                                        info.max_model_len),
            "min_tokens": sp.min_tokens, "min_p": sp.min_p, "presence_penalty": sp.presence_penalty,
            "frequency_penalty": sp.frequency_penalty, "stop_token_ids": tuple(sp.stop_token_ids),
            "ignore_eos": sp.ignore_eos,
        }
        if sp.HasField("temperature"):
            kwargs["temperature"] = sp.temperature
        if sp.top_p:
            kwargs["top_p"] = sp.top_p
        if sp.top_k:
            kwargs["top_k"] = sp.top_k
        if sp.repetition_penalty:
            kwargs["repetition_penalty"] = sp.repetition_penalty
        if sp.HasField("seed"):
            kwargs["seed"] = sp.seed
        if sp.HasField("logprobs"):
            kwargs["logprobs"] = sp.logprobs
        params = SamplingParams(**kwargs)  # type: ignore[arg-type]
        info.validate(prompt, params)
    except FieldError as exc:
        if exc.field.startswith("prompt_token_ids"):
            raise FieldError("tokenized.input_ids" + exc.field[len("prompt_token_ids"):], exc.message) from None
        raise exc.within("sampling_params") from None
    return EngineRequest(request.request_id, prompt, params, stops, sp.skip_special_tokens, request.stream)
