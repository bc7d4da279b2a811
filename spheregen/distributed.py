"""Work split across accelerate processes, by batch index.

Evaluation shards whole batches: process ``r`` of ``P`` takes batches ``r, r+P, ...``
of the same batch size the single process would use, so every batch is computed on
exactly the inputs (and, for sampling, the per-batch seeded noise) it would see alone,
and the result gathered on the main process equals the single-process one bit for bit.
Outside a launcher there is one process and nothing is gathered.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
from accelerate import PartialState

T = TypeVar("T")


# Other processes wait in a collective while the main process works alone (reference
# features, FLOP counts and timings, writing samples): far longer than the 10-minute
# default of a NCCL process group on a paper-scale evaluation.
TIMEOUT = timedelta(hours=3)


def state() -> PartialState:
    """The shared accelerate state; the first call (the CLI makes it before anything
    else) fixes it: CPU where there is no GPU (otherwise accelerate sees a CPU launch,
    torchrun or debug_launcher, as one process), and :data:`TIMEOUT` for collectives."""
    return PartialState(cpu=not torch.cuda.is_available(), timeout=TIMEOUT)


def is_main() -> bool:
    return state().is_main_process


def map_batches(n_batches: int, fn: Callable[[int], T]) -> list[T] | None:
    """``[fn(0), ..., fn(n_batches - 1)]`` with the calls spread over the processes,
    gathered on the main process only (the others get None: only the main process
    writes or scores, and an all-gather would put every sample on every process)."""
    st = state()
    mine = [(i, fn(i)) for i in range(st.process_index, n_batches, st.num_processes)]
    if st.num_processes == 1:
        return [out for _, out in mine]
    gathered: list[list[tuple[int, Any]]] | None = [None] * st.num_processes if st.is_main_process else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return None
    return [out for _, out in sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])]


def barrier() -> None:
    st = state()
    if st.num_processes > 1:
        st.wait_for_everyone()
