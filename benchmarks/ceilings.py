"""This GPU's own ceilings, measured at the start of a benchmark run, for the floors every table shows:
memory bandwidth (a large device-to-device copy, bytes read plus bytes written) and the bf16 matrix
rate (a large product on random data, not zeros: zeros run faster than real data)."""

import torch


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` on the GPU (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure_ceilings(copy_bytes: int = 4 << 30, matmul_size: int = 8192) -> dict:
    """{"copy_bytes_s": bytes/s, "matmul_flops": FLOP/s} on the current CUDA device."""
    if not torch.cuda.is_available():
        return {"copy_bytes_s": float("nan"), "matmul_flops": float("nan")}
    source = torch.empty(copy_bytes // 2, dtype=torch.uint8, device="cuda").random_()
    target = torch.empty_like(source)
    copy_ms = median_ms(lambda: target.copy_(source), 10)
    del source, target
    a = torch.randn(matmul_size, matmul_size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(matmul_size, matmul_size, device="cuda", dtype=torch.bfloat16)
    matmul_ms = median_ms(lambda: a @ b, 10)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_s": copy_bytes / (copy_ms / 1e3),
            "matmul_flops": 2 * matmul_size ** 3 / (matmul_ms / 1e3)}
