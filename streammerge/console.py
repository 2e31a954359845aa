"""The `streammerge` command's entry point, kept free of heavy imports: importing the command line
(torch, the methods) takes a second or more, and Ctrl-C in that second ends the command like
Ctrl-C later does — one line and exit status 130 — not with a traceback from inside an import."""

from __future__ import annotations

import gc
import os
import sys

from .errors import Interrupted  # no imports of its own


def entry() -> None:
    from . import cpu  # no imports of its own

    cpu.mark()  # the other processes' load is measured over the imports (cpu.py)
    # torch's OpenMP threads spin for a while after each parallel operation, on the cores numba's
    # pool then computes on (bench/results/README.md, "Round seven"): they sleep instead, unless
    # the user says otherwise (read when torch loads its OpenMP runtime, so before that)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .allocator import huge_pages_for_large_tensors  # ctypes only

    huge_pages_for_large_tensors()  # before torch's first allocation (why: allocator.py)
    # Python's cyclic collector walks every tracked object each time it runs: while torch's ~0.26 M
    # objects are being made it ran ~380 times (0.15 s), and after that every full collection walks
    # them all again. So: off while importing, then those objects frozen out of its reach (they live
    # as long as the process). bench/results/README.md, "Round five".
    gc.disable()
    try:
        from .cli import entry as run
    except KeyboardInterrupt:
        sys.stderr.write("streammerge: interrupted while starting; nothing was written\n")
        sys.stderr.flush()
        os._exit(Interrupted.exit_code)  # as cli.entry leaves on an interrupt (why: there)
    finally:
        gc.freeze()
        gc.enable()
    run()
