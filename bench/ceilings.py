"""The two hardware ceilings every GPU figure is compared with, measured in the same process as the figure.

- copy: a device-to-device copy of ``gib`` GiB, reported as (bytes read + bytes written) / time, the usual
  convention for copy bandwidth (METHOD.md in the device library);
- matmul: an ``n`` x ``n`` x ``n`` bf16 product through torch (cuBLAS) on random data (zeros flatter it).

Both are medians of ``triton.testing.do_bench`` (events, warm-up, L2 flushed). Never hard-code one GPU's
number: the H100 (3.0 TB/s) and the H200 (4.2-4.3 TB/s) differ by 1.4x.

    python bench/ceilings.py          # prints both and the GPU's name
"""

from __future__ import annotations

import torch


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_tbps(gib: float = 2.0, device: str | torch.device = "cuda") -> float:
    """Device-to-device copy bandwidth in TB/s (1e12 B/s), counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    src = torch.randint(-(2**15), 2**15 - 1, (n,), dtype=torch.int16, device=device)  # random, never zeros
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e9


def matmul_tflops(n: int = 8192, device: str | torch.device = "cuda") -> float:
    """Dense bf16 matrix-product rate in TFLOP/s (2 n^3 per product) on random inputs."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name()}: copy {copy_tbps():.3f} TB/s, bf16 matmul {matmul_tflops():.0f} TFLOP/s")
