"""Work split across accelerate processes, by batch index.

Evaluation shards whole batches: process ``r`` of ``P`` takes a contiguous block of
batches (:func:`block`) of the same batch size the single process would use, so every
batch is computed on exactly the inputs (and, for sampling, the per-batch seeded noise)
it would see alone, and results put back in batch order (:func:`gather`) equal the
single-process ones bit for bit. Outside a launcher there is one process and nothing is
gathered.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch

from spheregen.errors import SpheregenError

T = TypeVar("T")


# Other processes wait in a collective while the main process works alone (reference
# features, FLOP counts and timings, writing samples): far longer than the 10-minute
# default of a NCCL process group on a paper-scale evaluation.
TIMEOUT = timedelta(hours=3)


def state() -> Any:
    """The shared accelerate state; the first call (the CLI makes it before anything
    else) fixes it: CPU where there is no GPU (otherwise accelerate sees a CPU launch,
    torchrun or debug_launcher, as one process), and :data:`TIMEOUT` for collectives."""
    # imported here: modules that only read files (the report) must not start accelerate
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=TIMEOUT)


def is_main() -> bool:
    return state().is_main_process


def block(n: int) -> range:
    """This process's share of ``n`` items in order: process ``r`` of ``P`` takes
    ``[r·n // P, (r+1)·n // P)``, so the blocks of processes 0, 1, ... concatenate to
    ``range(n)`` (a sample set's shards, written by each process, are its batches in order)."""
    st = state()
    return range(st.process_index * n // st.num_processes, (st.process_index + 1) * n // st.num_processes)


def gather(obj: T) -> list[T] | None:
    """``obj`` of every process in process order, on the main process only (the others
    get None: only the main process writes or scores, and an all-gather would put
    every process's share on every process)."""
    st = state()
    if st.num_processes == 1:
        return [obj]
    gathered: list[Any] | None = [None] * st.num_processes if st.is_main_process else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def on_main(fn: Callable[[], T]) -> T | None:
    """``fn()`` on the main process (None elsewhere); an exception it raises is raised on
    every process, so the others fail with the same message instead of waiting in the
    next collective until the timeout."""
    st = state()
    if st.num_processes == 1:
        return fn()
    result, error = None, None
    if st.is_main_process:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every process
            error = exc
    # what the others raise: the same user-facing error, or a plain one naming it
    box = [None if error is None else (type(error), str(error))]
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        cls, message = box[0]
        raise cls(message) if issubclass(cls, SpheregenError) else RuntimeError(
            f"the main process failed: {cls.__name__}: {message}")
    return result


def barrier() -> None:
    st = state()
    if st.num_processes > 1:
        st.wait_for_everyone()
