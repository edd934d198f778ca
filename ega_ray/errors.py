"""The errors a user can fix: each carries one line that names the field, file or value at fault and what
is allowed. The CLI prints them without a traceback (exit 2). Imports nothing of the package."""

from __future__ import annotations

from collections.abc import Iterator


class UsageError(ValueError):
    """Bad input the user can correct; ``label`` heads the CLI's one-line message. Given several messages
    (every problem of a config file), it holds them all: ``problems``, one line each."""

    label = "error"

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = [" ".join(p.split()) for p in problems] or [""]


class ConfigError(UsageError):
    """A configuration that cannot run; the message is one line naming the field."""

    label = "config error"


class OutputFolderError(UsageError):
    """An output folder that a command may not write: another program's files, another run, in use."""

    label = "output folder"


class DataError(UsageError):
    """A dataset whose content cannot be trained on: the message names the split, the row and the column."""

    label = "data error"


class DivergedError(UsageError):
    """Training diverged: a loss term is not finite. The message names the epoch, the step, the term and the
    learning rate; nothing of the diverged epoch is checkpointed or exported."""

    label = "diverged"


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C during a search or a benchmark, raised from the KeyboardInterrupt so that the command stops as
    a Ctrl-C does (exit 130) and its one line says what was left unfinished and how to continue it."""


def iter_causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every error behind it, each once: its causes and contexts, the error raised inside a Ray
    task, a Ray Data stage or a Ray Train worker that Ray re-raised on the driver wrapped in its own
    exceptions (``cause``, ``_cause``), and Ray Train V2's per-worker failures (``worker_failures``).

    Args:
        err: the error as it reached the driver.

    Returns:
        An iterator over the errors, ``err`` first.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for attr in ("cause", "__cause__", "__context__", "_cause"):
            nxt = getattr(e, attr, None)
            if isinstance(nxt, BaseException):
                todo.append(nxt)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]


def find_usage_error(err: BaseException) -> UsageError | None:
    """The UsageError behind ``err`` (:func:`iter_causes`): itself, or one raised inside Ray.

    Args:
        err: the error as it reached the driver.

    Returns:
        The UsageError to report in one line, or None.
    """
    for e in iter_causes(err):
        if isinstance(e, UsageError):  # Ray's RayTaskError(X) is an X too; its ``cause`` is the plain one
            cause = getattr(e, "cause", None)
            return cause if isinstance(cause, UsageError) else e
    return None
