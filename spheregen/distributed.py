"""Work split across accelerate processes, by batch index.

Evaluation shards whole batches: process ``r`` of ``P`` takes batches ``r, r+P, ...``
of the same batch size the single process would use, so every batch is computed on
exactly the inputs (and, for sampling, the per-batch seeded noise) it would see alone,
and the gathered result equals the single-process one bit for bit. Outside a launcher
there is one process and nothing is gathered.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

T = TypeVar("T")


def state() -> PartialState:
    # cpu=True where there is no GPU: without it accelerate sees a CPU launch (torchrun,
    # debug_launcher) as one process; the first construction fixes the shared state
    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    return state().is_main_process


def map_batches(n_batches: int, fn: Callable[[int], T]) -> list[T]:
    """``[fn(0), ..., fn(n_batches - 1)]`` with the calls spread over the processes;
    every process returns the whole list, in batch order."""
    st = state()
    mine = [(i, fn(i)) for i in range(st.process_index, n_batches, st.num_processes)]
    if st.num_processes == 1:
        return [out for _, out in mine]
    gathered: list[tuple[int, Any]] = gather_object(mine)
    return [out for _, out in sorted(gathered, key=lambda pair: pair[0])]


def barrier() -> None:
    st = state()
    if st.num_processes > 1:
        st.wait_for_everyone()
