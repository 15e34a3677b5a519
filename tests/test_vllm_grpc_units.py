"""The pure pieces of the SMG worker servicer: request translation and refusals, stop strings, tokenizer zip."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
import tokenizers

from engine_service.constraints import ConstraintKind, OutputConstraint
from engine_service.generate_request import generate_inputs
from engine_service.limits import RequestLimits
from engine_service.protocol import EngineInfo
from engine_service.vllm_grpc.requests import engine_request
from engine_service.vllm_grpc.stops import StopWatch
from engine_service.vllm_grpc.tokenizer_files import tokenizer_chunks
from qwen3serve.engine.v1 import engine_pb2
from qwen3serve.smg import vllm_engine_pb2 as pb
from service_common.validation import FieldError

INFO = EngineInfo(
    vocab_size=1000,
    max_model_len=64,
    eos_token_ids=(7,),
    dtype="bfloat16",
    tensor_parallel_size=1,
    kv_block_size=16,
    num_kv_blocks=8,
    attention_backend="torch",
    max_waiting_requests=8,
)


def request(**sampling: object) -> pb.GenerateRequest:
    r = pb.GenerateRequest(request_id="r1", tokenized=pb.TokenizedInput(input_ids=[1, 2, 3]), stream=True)
    for name, value in sampling.items():
        if name == "stop":
            r.sampling_params.stop.extend(value)  # type: ignore[arg-type]
        elif name == "logit_bias":
            r.sampling_params.logit_bias.update(value)  # type: ignore[arg-type]
        elif name == "choice":
            r.sampling_params.choice.choices.append("a")
        else:
            setattr(r.sampling_params, name, value)
    return r


def test_translation_keeps_what_the_engine_honours() -> None:
    req = engine_request(
        request(temperature=0.0, max_tokens=5, min_tokens=2, stop=["\n"], seed=3, logprobs=2), INFO, RequestLimits()
    )
    p = req.params
    assert (p.temperature, p.max_tokens, p.min_tokens, p.seed, p.logprobs, p.top_p, p.top_k) == (0, 5, 2, 3, 2, 1.0, -1)
    assert req.stop == ("\n",) and req.prompt_token_ids == [1, 2, 3]


@pytest.mark.parametrize(
    "sampling, field",
    [
        ({"n": 17}, "sampling_params.n"),  # over --max-n
        ({"structural_tag": "{}"}, "sampling_params.structural_tag"),
        ({"json_schema": "x" * 70000}, "sampling_params.json_schema"),  # over --max-constraint-bytes
        ({"json_schema": "{}", "ignore_eos": True}, "sampling_params.ignore_eos"),
        ({"prompt_logprobs": 21}, "sampling_params.prompt_logprobs"),  # over the limit (20); -1 (all) too
        ({"max_tokens": 100}, "sampling_params.max_tokens"),
        ({"top_p": 1.5}, "sampling_params.top_p"),
        ({"stop": [""]}, "sampling_params.stop[0]"),
        ({"logit_bias": {-3: 1.0}}, "sampling_params.logit_bias[-3]"),
        ({"logit_bias": {5: 500.0}}, "sampling_params.logit_bias[5]"),
        ({"truncate_prompt_tokens": -2}, "sampling_params.truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 0}, "sampling_params.truncate_prompt_tokens"),
    ],
)
def test_unsupported_or_bad_fields_are_named(sampling: dict, field: str) -> None:
    with pytest.raises(Exception) as err:
        engine_request(request(**sampling), INFO, RequestLimits())
    assert getattr(err.value, "field", None) == field


def test_n_reaches_the_engine_and_zero_means_one() -> None:
    assert engine_request(request(n=4), INFO, RequestLimits()).params.n == 4
    assert engine_request(request(), INFO, RequestLimits()).params.n == 1


@pytest.mark.parametrize(
    "sampling, kind, spec",
    [
        ({"json_schema": '{"type": "object"}'}, ConstraintKind.JSON_SCHEMA, '{"type": "object"}'),
        ({"regex": "a+"}, ConstraintKind.REGEX, "a+"),
        ({"grammar": 'root ::= "x"'}, ConstraintKind.GRAMMAR, 'root ::= "x"'),
        ({"json_object": True}, ConstraintKind.JSON_OBJECT, ""),
        ({"choice": True}, ConstraintKind.CHOICE, ""),
    ],
)
def test_constraints_reach_the_engine(sampling: dict, kind: ConstraintKind, spec: str) -> None:
    for first in (False, True):
        params = engine_request(request(grammar_from_first_token=first, **sampling), INFO, RequestLimits()).params
        assert params.constraint == OutputConstraint(
            kind, spec, choices=("a",) if kind is ConstraintKind.CHOICE else (), from_first_token=first
        )
    assert engine_request(request(json_object=False), INFO, RequestLimits()).params.constraint is None


def test_logit_bias_and_truncation_reach_the_engine_as_our_own_front_door_takes_them() -> None:
    req = engine_request(request(logit_bias={5: -100.0}, truncate_prompt_tokens=2), INFO, RequestLimits())
    assert req.params.logit_bias == ((5, -100.0),) and req.prompt_token_ids == [2, 3]
    r = request(truncate_prompt_tokens=-1)  # vLLM's "the model's length": room for one generated token
    r.tokenized.input_ids[:] = list(range(100))
    assert engine_request(r, INFO, RequestLimits()).prompt_token_ids == list(range(100 - 63, 100))


def test_text_input_and_kv_transfer_are_refused() -> None:
    r = pb.GenerateRequest(request_id="r", text="hi")
    with pytest.raises(FieldError, match="^text"):
        engine_request(r, INFO, RequestLimits())
    r = request()
    r.kv_transfer_params_json = "{}"
    with pytest.raises(FieldError, match="^kv_transfer_params_json"):
        engine_request(r, INFO, RequestLimits())
    r = request()
    r.tokenized.input_ids[:] = [5000]
    with pytest.raises(FieldError, match=r"^tokenized\.input_ids"):
        engine_request(r, INFO, RequestLimits())


def test_stop_watch_finds_the_token_that_completes_the_stop(demo_checkpoint: Path) -> None:
    fast = tokenizers.Tokenizer.from_file(str(demo_checkpoint / "tokenizer.json"))
    ids = fast.encode("Hello world, stop here please", add_special_tokens=False).ids
    watch = StopWatch(fast, ["stop here"])
    first, hit = next((i, h) for i, t in enumerate(ids) if (h := watch.push([t])) is not None)
    assert fast.decode(ids[: first + 1]).endswith("stop here") and hit.stop == "stop here" and hit.keep == 1
    whole = StopWatch(fast, ["stop here"]).push(ids)  # all at once: the same token, counted from the start
    assert whole is not None and whole.keep == first + 1
    assert first < len(ids) - 1  # " please" was not needed to see it
    # min_tokens: a stop string inside the first min_tokens tokens does not end the request
    assert StopWatch(fast, ["Hello"], min_tokens=len(ids)).push(ids) is None
    assert StopWatch(fast, ["Hello"]).push(ids) is not None


def test_tokenizer_zip_chunks_carry_the_sha256(demo_checkpoint: Path) -> None:
    chunks = tokenizer_chunks(demo_checkpoint)
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest() and not any(c.sha256 for c in chunks[:-1])
    assert "tokenizer.json" in zipfile.ZipFile(io.BytesIO(data)).namelist()


def test_a_request_is_validated_once_at_the_service_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """generate_inputs, the conversion both servicers run, applies EngineInfo's rules itself (a prompt id past the
    vocabulary is refused there, with its proto path), and the SMG translation does not validate a second time.
    AsyncEngine.generate validates nothing; the engine core's admission check is a documented re-check."""
    calls: list[object] = []
    original = EngineInfo.validate

    def counted(self: EngineInfo, prompt: list[int], params: object) -> None:
        calls.append(prompt)
        original(self, prompt, params)  # type: ignore[arg-type]

    monkeypatch.setattr(EngineInfo, "validate", counted)
    engine_request(request(max_tokens=5), INFO, RequestLimits())
    assert len(calls) == 1
    ours = engine_pb2.GenerateRequest(prompt_token_ids=[1, INFO.vocab_size])
    with pytest.raises(FieldError) as err:
        generate_inputs(ours, INFO, RequestLimits())
    assert err.value.field == "prompt_token_ids" and "outside the vocabulary" in err.value.message
