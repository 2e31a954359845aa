#!/usr/bin/env python3
"""Host (anonymous) memory the CUDA libraries take, step by step: run on a CUDA machine.

    python bench/cuda_host_memory.py

Prints RssAnon (MiB) after `import torch`, CUDA initialisation, a matmul, and float32/float64
eigh, SVD, QR and solve at 4096². The same steps run inline (without the float64 QR) on the
H100 of 2026-11-25 (torch 2.11.0+cu130) went from
277 MiB after the import to 612 MiB after the float64 solve: the 335 MB that `plan.CUDA_LIBRARIES_HOST`
adds to a plan that uses the GPU (bench/results/gpu.md).
"""

import re

import torch


def anon() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) // 1024


def main() -> None:
    print("import", anon())
    torch.zeros(1, device="cuda")
    print("cuda init", anon())
    a = torch.randn(4096, 4096, device="cuda")
    (a @ a).sum().item()
    print("matmul", anon())
    for dtype in (torch.float32, torch.float64):
        m = a.to(dtype)
        steps = [
            ("eigh", lambda: torch.linalg.eigh(m @ m.T)),
            ("svd", lambda: torch.linalg.svd(m[:1024])),
            ("qr", lambda: torch.linalg.qr(m)),
            ("solve", lambda: torch.linalg.solve(m, m)),
        ]
        for name, step in steps:
            step()
            torch.cuda.synchronize()
            print(f"{name} {str(dtype).removeprefix('torch.')}", anon())


if __name__ == "__main__":
    main()
