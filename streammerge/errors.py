"""Project exceptions. The CLI turns each into one line on stderr and its exit code."""

from __future__ import annotations


class StreammergeError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(StreammergeError):
    """The recipe or command line is wrong (unknown method, parameter out of range...)."""

    exit_code = 2


class InputError(StreammergeError):
    """An input file or folder is missing, malformed or incompatible with the base."""

    exit_code = 3


class ResourceError(StreammergeError):
    """Disk, memory or another resource ran out or is insufficient for the plan."""

    exit_code = 4


class ResumeError(StreammergeError):
    """The output folder holds a merge of a different recipe/inputs, or something else."""

    exit_code = 5


class Interrupted(StreammergeError):
    """SIGINT/SIGTERM: the merge stopped at a clean point and can be resumed."""

    exit_code = 130


class NonFiniteError(InputError):
    """NaN or Inf met in an input tensor or produced by a computation."""


class NumericalError(InputError):
    """A factorisation failed on a tensor even after every fallback (math/robust.py)."""


def collect(problems: list[str], error: type[StreammergeError], what: str) -> None:
    """Raise `error` listing every problem at once (one line each), if there are any."""
    if len(problems) == 1:
        raise error(problems[0])
    if problems:
        raise error(f"{what}: {len(problems)} problems\n  " + "\n  ".join(problems))


def did_you_mean(unknown: list, known) -> str:
    """ "; did you mean 'x'?" where `unknown` holds one misspelt name and one of `known` is close to
    it, else "" (a guess for one of several unknown names would be a guess at which was meant)."""
    import difflib  # here: this module imports nothing at its top (console.py imports it first)

    if len(unknown) != 1:
        return ""
    close = difflib.get_close_matches(str(unknown[0]), sorted(known), n=1, cutoff=0.7)
    return f"; did you mean {close[0]!r}?" if close else ""
