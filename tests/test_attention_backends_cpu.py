"""GPU attention backends on a CPU machine: clear refusals, argument checks, and interpreter parity.

- the registry reports triton and flash-attn unavailable on CPU with a reason, and ``create_backend``
  raises a ValueError naming the backend;
- the kernel launchers reject bad arguments with a ValueError naming the argument (needs ``triton``
  importable, no GPU: the checks run before any launch);
- under the Triton interpreter (``TRITON_INTERPRET=1``, which must be set before triton is imported,
  hence a subprocess running this file) the store, decode (with and without split-K) and prefill
  kernels, and the whole Triton backend, match the PyTorch reference on CPU tensors.
  The interpreter runs fp16, not bf16: it keeps bf16 as raw uint16 and its ``tl.dot`` multiplies
  those integers (triton 3.6), so bf16 parity is left to tests/gpu/test_attention_kernels.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3.attention.backend import available_backends, backend_unavailable_reason, create_backend

CPU = torch.device("cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


@pytest.mark.parametrize("name", ["triton", "flash-attn"])
def test_gpu_backends_unavailable_on_cpu_with_reason(name: str) -> None:
    reason = backend_unavailable_reason(name, CPU)
    assert reason is not None
    # Either the module's own check (needs CUDA) or the registry's import failure (names the package).
    assert "cuda" in reason.lower() or "not installed" in reason, reason
    assert name not in available_backends(CPU)
    with pytest.raises(ValueError, match=f"attention_backend: .*{name}"):
        create_backend(name, CPU)


def test_torch_backend_is_what_auto_picks_on_cpu() -> None:
    assert available_backends(CPU) == ["torch"]
    assert create_backend("auto", CPU).name == "torch"


# ---- launcher argument checks (no kernel runs) ------------------------------------------------------
@needs_triton
def test_store_kv_rejects_bad_arguments() -> None:
    from qwen3.attention.kernels.store_kv import store_kv

    cache = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
    k = torch.zeros(3, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, k, cache, cache.clone(), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="^k has dtype"):
        store_kv(k.float(), k, cache, cache.clone(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="^v must be"):
        store_kv(k, k[:, :1], cache, cache.clone(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="v_cache must match k_cache"):
        store_kv(k, k, cache, cache[:, :8], torch.zeros(3, dtype=torch.int64))


@needs_triton
def test_decode_and_prefill_reject_bad_arguments() -> None:
    from qwen3.attention.kernels.decode_attention import paged_decode_attention
    from qwen3.attention.kernels.prefill_attention import paged_prefill_attention

    cache = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
    q = torch.zeros(3, 4, 64, dtype=torch.bfloat16)
    tables = torch.zeros(3, 2, dtype=torch.int32)
    lens = torch.ones(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, cache, cache.clone(), tables.long(), lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q, cache, cache.clone(), tables, lens[:2], 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode_attention(q[:, :3], cache, cache.clone(), tables, lens, 1.0)
    with pytest.raises(ValueError, match="k_cache dtype"):
        paged_decode_attention(q.float(), cache.float(), cache.float(), tables, lens, 1.0)
    with pytest.raises(ValueError, match="^out must be"):
        paged_decode_attention(q, cache, cache.clone(), tables, lens, 1.0, out=q[:2].clone())
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(q, cache, cache.clone(), tables, lens, torch.arange(3, dtype=torch.int32), 1, 1.0)
    with pytest.raises(ValueError, match="max_query_len"):
        paged_prefill_attention(q, cache, cache.clone(), tables, lens, torch.arange(4, dtype=torch.int32), 0, 1.0)


# ---- interpreter parity (subprocess) ---------------------------------------------------------------
INTERPRETER_TIMEOUT_S = 120


@needs_triton
def test_kernels_match_reference_under_triton_interpreter() -> None:
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join(
            [
                str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parent),
                os.environ.get("PYTHONPATH", ""),
            ]
        ),
    )
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=INTERPRETER_TIMEOUT_S
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not last.startswith("{"):
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads(last)
    if "interpreter_unusable" in report:
        pytest.skip(f"the Triton interpreter cannot run a runtime-bounded loop here: {report['interpreter_unusable']}")
    errors = report["errors"]
    assert len(errors) >= 10, errors
    bad = {name: err for name, err in errors.items() if not err <= 1e-2}  # `not <=` also catches NaN
    assert not bad, f"relative error above 1e-2 (or NaN): {bad}"


def _patch_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and turns them into loop bounds with
    ``int(array)``, which NumPy >= 2.4 refuses for arrays with ndim > 0 ("only 0-dimensional arrays can be
    converted to Python scalars"). Read the single element instead; a no-op where that hook is absent."""
    import triton.runtime.interpreter as interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _interpreter_probe() -> str | None:
    """None if the interpreter runs a kernel with a loop bounded by a loaded value, else the error."""
    import triton
    import triton.language as tl

    @triton.jit
    def count(n_ptr, out_ptr):
        total = 0
        for _ in range(0, tl.load(n_ptr), 2):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](torch.tensor([5], dtype=torch.int32), out)
    except (RuntimeError, TypeError, ValueError) as exc:  # InterpreterError is a RuntimeError
        return f"{type(exc).__name__}: {exc}"
    return None if out.item() == 3 else f"probe loop counted {out.item()} iterations, expected 3"


def _interpreter_main() -> None:
    """Runs in the subprocess (TRITON_INTERPRET=1): prints one JSON line of relative errors."""
    _patch_interpreter_scalar_index()
    problem = _interpreter_probe()
    if problem is not None:
        print(json.dumps({"interpreter_unusable": problem}))
        return

    from attention_cases import make_paged_case, relative_error

    from qwen3.attention.kernels.decode_attention import paged_decode_attention
    from qwen3.attention.kernels.prefill_attention import paged_prefill_attention
    from qwen3.attention.kernels.store_kv import store_kv
    from qwen3.attention.torch_backend import TorchAttentionBackend, paged_attention_reference
    from qwen3.attention.torch_backend import store_kv as store_ref
    from qwen3.attention.triton_backend import TritonAttentionBackend

    torch.manual_seed(0)
    errors: dict[str, float] = {}
    half = dict(dtype=torch.float16, device="cpu")

    # store: strided k/v, one padding slot (-1) that must leave the cache untouched
    case = make_paged_case([3, 1, 5], [0, 7, 16], 4, 2, 32, 16, **half)
    slots = case.batch.slot_mapping.clone()
    slots[1] = -1
    k_ref, v_ref = case.k_cache.clone(), case.v_cache.clone()
    store_kv(case.k, case.v, case.k_cache, case.v_cache, slots)
    store_ref(case.k, case.v, k_ref, v_ref, slots)
    same = torch.equal(case.k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0)) and torch.equal(
        case.v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0)
    )
    errors["store"] = 0.0 if same else float("inf")

    # decode: seq_len 1, on / across block boundaries; GQA 1..8; forced and heuristic split counts
    for hq, hkv, d, bs, splits in [
        (4, 4, 32, 16, 1),
        (8, 4, 32, 16, 4),
        (8, 2, 64, 16, None),
        (16, 2, 32, 256, 2),
        (8, 1, 32, 16, 3),
        (4, 2, 32, 16, 8),
    ]:
        contexts = [0, bs - 1, bs, bs + 1, 2 * bs + 5]
        case = make_paged_case([1] * len(contexts), contexts, hq, hkv, d, bs, seed=hq + d + bs, **half)
        store_kv(case.k, case.v, case.k_cache, case.v_cache, case.batch.slot_mapping)
        ref = paged_attention_reference(case.q, case.k_cache, case.v_cache, case.batch, case.scale)
        out = torch.full_like(ref, float("nan"))
        paged_decode_attention(
            case.q,
            case.k_cache,
            case.v_cache,
            case.batch.block_tables,
            case.batch.seq_lens,
            case.scale,
            num_splits=splits,
            block_n=16,
            out=out,
        )
        errors[f"decode hq{hq} hkv{hkv} d{d} bs{bs} splits{splits}"] = relative_error(out, ref)

    # prefill: fresh prompts, prefix hits, a chunk past a block boundary, a lone decode row, in one batch
    for hq, hkv, d, bs in [(4, 2, 32, 16), (8, 1, 32, 16), (3, 3, 32, 256), (8, 2, 64, 16)]:
        case = make_paged_case([1, 7, 20, 3, 33], [0, 0, bs - 1, 40, 16], hq, hkv, d, bs, seed=hq * d, **half)
        store_kv(case.k, case.v, case.k_cache, case.v_cache, case.batch.slot_mapping)
        ref = paged_attention_reference(case.q, case.k_cache, case.v_cache, case.batch, case.scale)
        out = torch.full_like(ref, float("nan"))
        paged_prefill_attention(
            case.q,
            case.k_cache,
            case.v_cache,
            case.batch.block_tables,
            case.batch.seq_lens,
            case.batch.query_start_loc,
            case.batch.max_query_len,
            case.scale,
            out=out,
        )
        errors[f"prefill hq{hq} hkv{hkv} d{d} bs{bs}"] = relative_error(out, ref)

    # the backend end to end (store + attention) against the torch backend, decode and prefill steps
    for query_lens, contexts in [([1, 1, 1], [0, 17, 31]), ([4, 1, 9], [12, 0, 16])]:
        case = make_paged_case(query_lens, contexts, 4, 2, 32, 16, seed=len(contexts) + sum(query_lens), **half)
        k_ref, v_ref = case.k_cache.clone(), case.v_cache.clone()
        want = TorchAttentionBackend().forward(case.q, case.k, case.v, k_ref, v_ref, case.batch, case.scale)
        got = TritonAttentionBackend().forward(
            case.q, case.k, case.v, case.k_cache, case.v_cache, case.batch, case.scale
        )
        kind = "decode" if case.batch.is_decode else "prefill"
        errors[f"backend {kind}"] = relative_error(got, want)
    print(json.dumps({"errors": errors}))


if __name__ == "__main__":
    _interpreter_main()


@pytest.mark.parametrize("capability, first", [((9, 0), "triton"), ((10, 0), "flash-attn"), ((8, 0), "triton")])
def test_auto_order_follows_the_compute_capability_table(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], first: str
) -> None:
    from qwen3.attention import backend as backend_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    order = backend_module.auto_order(torch.device("cuda"))
    assert order[0] == first and set(order) == {"triton", "flash-attn", "torch"}
    assert backend_module.auto_order(torch.device("cpu")) == backend_module.AUTO_ORDER
