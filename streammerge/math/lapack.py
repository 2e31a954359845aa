"""Factorisations whose result does not depend on the number of CPU threads.

On the CPU, torch's LAPACK (MKL in its wheels) gives eigh, svd, qr and solve results that differ
in the last bits with the thread count — measured on this project's machine at 700×700, float32
and float64, one thread against two — while its matrix products (gemm) do not. A merge takes as
many threads as cores are free of load when it starts (cpu.py), and a Ray task takes `--threads`,
so without this the same command could give different bytes on a busier machine, and a Ray merge
differ from the local one (it did: 0.5 % of the entries of OrthoMerge's float32 `down_proj` at
1.5B shapes, one bf16 step apart). So every factorisation on the CPU runs on one thread: on this
project's 2 cores that makes an SVD or eigh 1.4–2.0× slower than on two (1500² to 3000²,
bench/results/lapack-threads.md), the price of output that does not depend on the load. CUDA
calls are left as they are.
"""

from __future__ import annotations

import torch


def _one_thread(name: str, namespace=torch.linalg):
    def call(a: torch.Tensor, *args, **kwargs):
        fn = getattr(namespace, name)  # looked up per call, so a test may replace it
        threads = torch.get_num_threads()
        if a.device.type != "cpu" or threads == 1:
            return fn(a, *args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(a, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"torch.{'linalg.' if namespace is torch.linalg else ''}{name} on one thread on the CPU."
    return call


svd = _one_thread("svd")
eigh = _one_thread("eigh")
qr = _one_thread("qr")
solve = _one_thread("solve")
solve_ex = _one_thread("solve_ex")
inv = _one_thread("inv")
pinv = _one_thread("pinv")
det = _one_thread("det")
# In place where given `out=` the input itself, on a column-major view (`m.T` of a row-major m):
# what the wide OrthoMerge path uses to factor 3 GB matrices without a copy (math/procrustes_wide.py)
lu_factor_ex = _one_thread("lu_factor_ex")
lu_solve = _one_thread("lu_solve")
householder_product = _one_thread("householder_product")
geqrf = _one_thread("geqrf", torch)
