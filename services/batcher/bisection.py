"""Re-running a failed batch in halves, so that only the requests a model rejects fail.

A model call that raises on a batch of n requests does not say which of them is at fault
(one token id past the vocabulary fails the whole embedding lookup). The batch is split in
halves and each half run again, recursively, until every failing request stands alone: the
runs form a binary tree with at most n leaves, so there are at most 2n - 1 runs (n - 1 splits).
Only a model-call error splits a batch; an unavailable worker or a passed deadline says
nothing about the inputs. The verdict on a request that failed alone is `lone_failure`'s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.mesh.domain.errors import InfermeshError, InvalidInput, ModelFailed

T = TypeVar("T")


@dataclass(slots=True)
class Outcome(Generic[T]):
    """What a bisection left unanswered: the members that failed alone (with the model's
    error), the pieces that failed for another reason, and how many times it split."""

    lone: list[tuple[T, InfermeshError]] = field(default_factory=list)
    unsplit: list[tuple[list[T], InfermeshError]] = field(default_factory=list)
    splits: int = 0


def is_model_fault(error: InfermeshError) -> bool:
    """Whether `error` is the model's call failing on the batch's content: the model rejected
    an input (`InvalidInput`) or raised (`ModelFailed`)."""
    return isinstance(error, InvalidInput | ModelFailed)


async def bisect(
    members: list[T], run: Callable[[list[T]], Awaitable[InfermeshError | None]], *,
    due: Callable[[list[T]], list[T]],
) -> Outcome[T]:
    """Run `members` as one batch with `run` (None: answered; else the batch's error), and
    each half of a batch the model failed on again, first half first. `due` takes a piece
    about to be run and returns the members still worth running (it answers the others)."""
    outcome: Outcome[T] = Outcome()
    pieces = [members]
    while pieces:
        piece = due(pieces.pop())
        if not piece:
            continue
        error = await run(piece)
        if error is None:
            continue
        if not is_model_fault(error):
            outcome.unsplit.append((piece, error))
        elif len(piece) == 1:
            outcome.lone.append((piece[0], error))
        else:
            half = len(piece) // 2
            pieces += [piece[half:], piece[:half]]
            outcome.splits += 1
    return outcome


def lone_failure(request_id: str, error: InfermeshError, *, others_ok: bool) -> InfermeshError:
    """The error for a request the model failed on alone. A rejected input stays itself (the
    worker named the fault); a model failure becomes the input's fault (a 4xx) when other
    requests of its batch ran, and stays the model's (a 5xx) when none of them did."""
    if isinstance(error, ModelFailed) and others_ok:
        return InvalidInput(f"model rejected the input of request {request_id!r}: {error.message}")
    return error
