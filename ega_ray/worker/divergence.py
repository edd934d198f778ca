"""Stop a run at its first non-finite loss, without a host sync per step.

Each step, :meth:`NonFiniteWatch.observe` folds the step's loss terms into a record kept on the device (the
first step of the epoch with a term that is not finite, and which term): a few device operations, no
transfer to the host, so a GPU's queue of kernels is never drained for it. The host reads the record
(:meth:`NonFiniteWatch.check`) every ``check_every`` steps and always at the end of the epoch, before anything
is evaluated, reported or checkpointed, so no checkpoint and no exported student holds a non-finite value. The
record is all-reduced (the earliest step, then the first term, over the ranks): every rank of a DDP run
reads the same answer at the same step and raises the same :class:`DivergedError` together, and none is left
waiting in a collective. The check is the same on a CPU, where reading the record costs no stall but the
all-reduce is a collective of its own: once per ``check_every`` steps, not per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ega_ray.errors import DivergedError

CHECK_EVERY = 25  # steps between host reads: what a divergence may cost in wasted steps, at most
NONE = torch.iinfo(torch.int64).max  # "no non-finite step yet": larger than any code
WEIGHTS = "weights"  # the term that names parameters gone non-finite while every loss stayed finite

TERM_WORDS = {
    "loss": "the loss (loss)",
    "ce": "the student's cross-entropy (ce)",
    "distill": "the distiller's loss (distill)",
    "kd": "the KD term (kd)",
    "teacher_ce": "the teacher head's cross-entropy (teacher_ce)",
    "ntxent": "the SimCLR loss (NT-Xent)",
    WEIGHTS: "the trained weights",
}


class NonFiniteWatch:
    """The first step of an epoch whose loss terms are not all finite, and the first such term in ``terms``
    order (list the components before their sum: the most specific name wins), kept on ``device``.

    Args:
        terms: the names of the values :meth:`observe` receives, in order.
        device: where the record lives (the losses' device).
        check_every: :meth:`due` is true every this many steps.
    """

    def __init__(self, terms: Sequence[str], device: torch.device, check_every: int = CHECK_EVERY) -> None:
        self.terms = [*terms, WEIGHTS]
        self.check_every = check_every
        self.first = torch.full((), NONE, dtype=torch.int64, device=device)  # step * len(terms) + term
        self.steps = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> None:
        """A new epoch: steps count from 1 again."""
        self.first.fill_(NONE)
        self.steps.zero_()

    def _record(self, bad: torch.Tensor, code: torch.Tensor) -> None:
        self.first = torch.where(bad.any() & (self.first == NONE), code, self.first)

    def observe(self, values: torch.Tensor) -> None:
        """Fold one step's terms (a 1-D tensor in ``terms`` order) into the record, on the device."""
        self.steps += 1
        bad = ~torch.isfinite(values.detach().float())
        self._record(bad, self.steps * len(self.terms) + bad.to(torch.int64).argmax())

    def observe_weights(self, parameters: Iterable[torch.Tensor]) -> None:
        """Record ``parameters`` that are not all finite as the term ``weights`` after the last step (a step
        with finite losses can still take the weights to infinity)."""
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in parameters]).all()
        self._record(~finite, self.steps * len(self.terms) + len(self.terms) - 1)

    def due(self, step: int) -> bool:
        """Whether the host should read the record after ``step`` (counted from 1 within the epoch)."""
        return step % self.check_every == 0

    def check(self) -> tuple[int, str] | None:
        """(step, term) of the first non-finite value so far this epoch over every rank, or None. A host
        sync, and a collective: every rank calls it at the same step."""
        code = self.first.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(code, op=dist.ReduceOp.MIN)
        found = int(code.item())
        if found == NONE:
            return None
        step, term = divmod(found, len(self.terms))
        return step, self.terms[term]

    def raise_if_diverged(
        self, epoch: int, lr: float, lr_field: str, own_lr: Mapping[str, tuple[float, str]] | None = None
    ) -> None:
        """:meth:`check`, raising a :class:`DivergedError` when a value was not finite.

        Args:
            epoch: the epoch, counted from 1.
            lr: the learning rate of the epoch.
            lr_field: the config field that sets it, named in the advice.
            own_lr: (lr, field) of the terms that another optimizer minimises (the teacher head's CE).
        """
        found = self.check()
        if found is not None:
            step, term = found
            lr, lr_field = (own_lr or {}).get(term, (lr, lr_field))
            raise DivergedError(diverged_message(epoch, step, term, lr, lr_field))


def stop_on_divergence(train_fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], Any]:
    """``train_fn`` as a Ray Train worker function that ends a diverged run by returning ``{"diverged": line}``
    instead of raising: every rank raised the same DivergedError at the same step, so the worker group
    finishes together, and the driver (``launch.fit``) raises it as one line. Raised, it would be a worker
    failure that Ray Train logs with a traceback and restarts from the last checkpoint (``run.max_failures``)
    only to diverge again at the same step."""

    @functools.wraps(train_fn)
    def worker(config: dict[str, Any]) -> dict[str, str] | None:
        try:
            train_fn(config)
        except DivergedError as err:
            return {"diverged": str(err)}
        return None

    return worker


def diverged_message(epoch: int, step: int, term: str, lr: float, lr_field: str) -> str:
    """The one line of a diverged run: where, which term, the learning rate, what to change."""
    what = TERM_WORDS.get(term, f"the {term} loss")
    at = f"epoch {epoch}, step {step}"
    where = f"are not finite after {at}" if term == WEIGHTS else f"is not finite at {at}"
    weights = " (or the loss weights)" if lr_field == "optim.lr" else ""  # gamma, beta, alpha: distill only
    return (
        f"{what} {where} (lr {lr:g}); nothing of this epoch is checkpointed. Lower {lr_field}{weights} and "
        "train in a new output folder"
    )
