"""The `streammerge` command's entry point, kept free of heavy imports: importing the command line
(torch, the methods) takes a second or more, and Ctrl-C in that second ends the command like
Ctrl-C later does — one line and exit status 130 — not with a traceback from inside an import."""

from __future__ import annotations

import os
import sys

from .errors import Interrupted  # no imports of its own


def entry() -> None:
    try:
        from .cli import entry as run
    except KeyboardInterrupt:
        sys.stderr.write("streammerge: interrupted while starting; nothing was written\n")
        sys.stderr.flush()
        os._exit(Interrupted.exit_code)  # as cli.entry leaves on an interrupt (why: there)
    run()
