"""The deterministic training data path (``run.deterministic``): which rows each worker trains on in an
epoch, and in which order, as a pure function of (seed, epoch, row index).

Ray Data's ``streaming_split`` hands blocks to whichever worker asks first, and its local shuffle buffer
is fed in arrival order, so which rows a rank sees, and when, depends on timing. Here every epoch has one
seeded permutation of the rows (:func:`epoch_order`), dealt round-robin to the ranks and cut to the same
length on each (:func:`rank_rows`: DDP needs equal step counts). A worker gathers its rows by their
``index`` from a pass over the whole, unsplit training split (:class:`EpochRows`), so neither block order
nor arrival order can change the result. The price: every worker reads the whole split (kept in its
memory after the first pass when it is small), and holds its own share of an epoch before the epoch starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

KEEP_ALL_BYTES = 256 << 20  # a split this small (decoded, with its attached columns) stays in memory


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of row indices 0..num_rows-1, a pure function of (seed, epoch).

    Args:
        num_rows: rows of the training split (their ``index`` numbers them 0..num_rows-1).
        seed: the run's seed.
        epoch: the 0-based epoch.

    Returns:
        int64 array: the rows in the order the epoch visits them.
    """
    return np.random.Generator(np.random.PCG64([seed % 2**64, epoch, 0x5EED])).permutation(num_rows).astype(np.int64)


def rank_rows(num_rows: int, seed: int, epoch: int, rank: int, world: int, rows_per_rank: int) -> np.ndarray:
    """The rows rank ``rank`` of ``world`` trains on in ``epoch``, in order: the epoch's permutation dealt
    round-robin and cut to ``rows_per_rank``, the same on every rank: global batch ``b`` is the permutation's
    ``b``-th block of ``world × per-rank batch`` rows, and the ranks' rows are disjoint.

    Args:
        num_rows: rows of the training split.
        seed: the run's seed.
        epoch: the 0-based epoch.
        rank: this worker's rank.
        world: the number of workers.
        rows_per_rank: rows each rank trains on this epoch (steps × per-worker batch).

    Returns:
        int64 array of ``rows_per_rank`` row indices.
    """
    mine = epoch_order(num_rows, seed, epoch)[rank::world]
    if len(mine) < rows_per_rank:
        raise ValueError(f"{num_rows} rows cannot give {world} workers {rows_per_rank} rows each")
    return mine[:rows_per_rank]


class EpochRows:
    """One worker's training rows of each epoch (:func:`rank_rows`), gathered by ``index`` from a pass over
    the whole training split (``read()``: numpy batches with an ``index`` column, in any order). A split of
    at most ``keep_bytes`` is read once and kept; a larger one is read again every epoch, keeping this rank's
    rows only.

    Args:
        read: a new pass over the training split.
        indices: the ``index`` values of the rows trained on (the split less a carved validation split:
            not always 0..n-1); the epoch's permutation orders their positions in sorted order.
        rank: this worker's rank.
        world: the number of workers.
        seed: the run's seed.
        keep_bytes: the largest split (decoded) kept in memory after its first pass.
    """

    def __init__(
        self,
        read: Callable[[], Iterable[dict[str, np.ndarray]]],
        indices: np.ndarray,
        rank: int,
        world: int,
        seed: int,
        keep_bytes: int = KEEP_ALL_BYTES,
    ) -> None:
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.num_rows = len(self.indices)
        self.read, self.rank, self.world, self.seed = read, rank, world, seed
        self.keep_bytes = keep_bytes
        self.kept: dict[str, np.ndarray] | None = None  # the whole split by index, once read (small splits)
        self.passes = 0  # passes over the split (one per run for a kept split)

    def batches(self, epoch: int, batch_size: int, steps: int) -> Iterator[dict[str, np.ndarray]]:
        """``steps`` batches of ``batch_size`` rows: this rank's rows of ``epoch``, in their order."""
        wanted = rank_rows(self.num_rows, self.seed, epoch, self.rank, self.world, steps * batch_size)
        rows = self._gather(wanted)
        for start in range(0, len(wanted), batch_size):
            yield {k: v[start : start + batch_size] for k, v in rows.items()}

    def _gather(self, wanted: np.ndarray) -> dict[str, np.ndarray]:
        if self.kept is not None:
            return {k: v[wanted] for k, v in self.kept.items()}
        slot = np.full(self.num_rows, -1, dtype=np.int64)
        slot[wanted] = np.arange(len(wanted))
        out: dict[str, np.ndarray] = {}
        whole: dict[str, np.ndarray] | None = None
        found = np.zeros(self.num_rows, dtype=bool)
        self.passes += 1
        for batch in self.read():
            index = np.asarray(batch["index"], dtype=np.int64)
            position = np.searchsorted(self.indices, index)  # the row's place among the rows trained on
            if (position >= self.num_rows).any() or not np.array_equal(self.indices[position], index):
                raise ValueError("the training split's pass gave a row index that is not among the rows trained on")
            index = position
            cols = {k: np.asarray(v) for k, v in batch.items()}
            if not out:
                out = {k: np.empty((len(wanted), *v.shape[1:]), v.dtype) for k, v in cols.items()}
                row_bytes = sum(v[:1].nbytes for v in cols.values())
                if self.num_rows * row_bytes <= self.keep_bytes:
                    whole = {k: np.empty((self.num_rows, *v.shape[1:]), v.dtype) for k, v in cols.items()}
            found[index] = True
            at = slot[index]
            mine = at >= 0
            for k, v in cols.items():
                out[k][at[mine]] = v[mine]
                if whole is not None:
                    whole[k][index] = v
        if not found.all():
            raise RuntimeError(
                f"the training split's pass gave {int(found.sum())} of its {self.num_rows} row indices"
            )
        self.kept = whole
        return out
