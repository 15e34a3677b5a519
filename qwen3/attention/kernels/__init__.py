"""Triton kernels for attention over the paged KV cache, one module per kernel family.

- ``store_kv``: scatter the step's new K/V into the cache at their slots.
- ``decode_attention``: one new token per sequence; split-K ("flash-decoding") with GQA grouping.
- ``prefill_attention``: varlen new tokens over a cached prefix plus themselves, causally.

Each module has a typed launcher that validates its tensors (``ValueError`` naming the argument) and
is tested against ``qwen3.attention.torch_backend`` (tests/gpu/test_attention_kernels.py on a GPU,
tests/test_attention_backends_cpu.py under the Triton interpreter). Importing a module needs
``triton``; this package file does not.
"""
