"""The divergence check on its own, without Ray: a sequence of step losses → the first non-finite step and
term, read only when the host asks, and the one line that names them."""

from __future__ import annotations

import math

import pytest
import torch

from ega_ray.errors import DivergedError
from ega_ray.worker.distill import WATCHED
from ega_ray.worker.divergence import NonFiniteWatch, diverged_message

NAN, INF = math.nan, math.inf


def _steps(watch: NonFiniteWatch, rows: list[dict[str, float]]) -> None:
    for row in rows:
        watch.observe(torch.tensor([row.get(term, 1.0) for term in WATCHED]))


def test_the_first_non_finite_step_and_its_most_specific_term_are_recorded() -> None:
    watch = NonFiniteWatch(WATCHED, torch.device("cpu"), check_every=3)
    _steps(watch, [{}, {}])
    assert watch.check() is None
    # step 3: the distiller's term and therefore the total are NaN: the part is named, not the sum;
    # later steps (every term bad) do not replace the first record
    _steps(watch, [{"distill": NAN, "loss": NAN}, {"ce": INF, "loss": INF}, {"teacher_ce": -INF}])
    assert watch.check() == (3, "distill")
    assert [watch.due(s) for s in range(1, 7)] == [False, False, True, False, False, True]


@pytest.mark.parametrize(
    ("row", "term"),
    [({"ce": NAN}, "ce"), ({"kd": INF}, "kd"), ({"teacher_ce": NAN}, "teacher_ce"), ({"loss": -INF}, "loss")],
)
def test_each_term_is_named(row: dict[str, float], term: str) -> None:
    watch = NonFiniteWatch(WATCHED, torch.device("cpu"))
    _steps(watch, [{}, row])
    assert watch.check() == (2, term)


def test_a_new_epoch_starts_clean_and_weights_are_checked_after_the_last_step() -> None:
    watch = NonFiniteWatch(WATCHED, torch.device("cpu"))
    _steps(watch, [{"ce": NAN}])
    watch.reset()
    _steps(watch, [{}, {}, {}])
    watch.observe_weights([torch.ones(3), torch.zeros(2, 2)])
    assert watch.check() is None
    watch.observe_weights([torch.ones(3), torch.tensor([[0.0, INF]])])
    assert watch.check() == (3, "weights")
    with pytest.raises(DivergedError, match=r"^the trained weights are not finite after epoch 4, step 3 \(lr 0\.5\)"):
        watch.raise_if_diverged(4, 0.5, "optim.lr")


def test_the_message_is_one_line_naming_epoch_step_term_and_lr() -> None:
    watch = NonFiniteWatch(WATCHED, torch.device("cpu"))
    _steps(watch, [{}] * 16 + [{"distill": NAN, "loss": NAN}])
    with pytest.raises(DivergedError) as caught:
        watch.raise_if_diverged(2, 156.0, "optim.lr", {"teacher_ce": (0.01, "optim.teacher_head_lr")})
    line = str(caught.value)
    assert "\n" not in line and line == diverged_message(2, 17, "distill", 156.0, "optim.lr")
    assert line.startswith("the distiller's loss (distill) is not finite at epoch 2, step 17 (lr 156); ")
    assert "Lower optim.lr" in line
    # the teacher head's CE is driven by its own optimizer: its lr and field are named
    watch.reset()
    _steps(watch, [{"teacher_ce": NAN}])
    with pytest.raises(DivergedError, match=r"\(lr 0\.01\).*Lower optim\.teacher_head_lr"):
        watch.raise_if_diverged(1, 156.0, "optim.lr", {"teacher_ce": (0.01, "optim.teacher_head_lr")})
