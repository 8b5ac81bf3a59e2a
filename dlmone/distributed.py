"""Data-parallel training over MPI: ``mpirun -n K dlmone train-teacher|distill|generate ...``.

Every rank holds the whole model, the whole data set and the same random state. Each
global batch of B examples is cut into K equal runs of rows (rank r computes rows
[r·B/K, (r+1)·B/K)). Everything random is drawn for the whole batch on every rank, from
the same generators and seeds as one process draws it, and each rank keeps its rows, so
every row gets the example, timestep and noise it gets in a single-process run. A rank's
loss and gradient are its rows' share of the global mean (their sum divided by B); one
in-place ``Allreduce`` of the flat float32 gradient buffer per network and step adds the
shares up, and identical optimisers then keep identical weights on every rank. Rank 0
alone writes checkpoints, logs and progress bars; every rank resumes from them.

:func:`world` returns the communicator of the current launch: :class:`MPIComm` under an
MPI launcher with K > 1 ranks, otherwise :class:`LocalComm`, whose collectives are
identities, so a run with K = 1 (or without mpirun) is exactly the single-process run.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
import zlib
from contextlib import contextmanager
from typing import Any, Iterator, List, Mapping, Optional

import numpy as np

# set by the launchers of Open MPI, MPICH / Intel MPI (Hydra), MVAPICH and Slurm's srun
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
# errors whose message says it all (the command line prints these without a traceback)
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError)


def shard_rows(batch: int, rank: int, size: int) -> slice:
    """The rows of a global batch that ``rank`` of ``size`` computes: an equal, contiguous share."""
    if batch % size:
        raise ValueError(f"batch_size={batch} is not divisible by the {size} MPI ranks "
                         f"(every rank takes an equal share of each global batch)")
    n = batch // size
    return slice(rank * n, (rank + 1) * n)


class LocalComm:
    """One process: this rank is the whole job and every collective is the identity."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.seconds = 0.0  # time spent in collectives (always 0 here)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch`` examples."""
        return shard_rows(batch, self.rank, self.size)

    def owns(self, index: int) -> bool:
        """Whether this rank computes the ``index``-th of a list of independent jobs
        (validation batches, generation batches): round robin over the ranks."""
        return index % self.size == self.rank

    def sum_inplace(self, buf: np.ndarray) -> np.ndarray:
        """Sum a C-contiguous array over the ranks, in place (every rank gets the sum)."""
        return buf

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        """Concatenate every rank's equal-sized ``local`` along axis 0, in rank order."""
        return local

    def allgather(self, obj: Any) -> List[Any]:
        """Every rank's (picklable) ``obj``, in rank order."""
        return [obj]

    def bcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        pass

    def check_same(self, settings: Mapping[str, Any]) -> None:
        """ValueError on every rank whose ``settings`` differ from rank 0's (a desynchronised
        launch, e.g. different flags per rank), naming the settings that differ."""

    def check_identical(self, arr: np.ndarray, what: str) -> None:
        """RuntimeError on every rank if the ranks' ``arr`` are not bit-for-bit the same."""

    @contextmanager
    def fail_fast(self) -> Iterator[None]:
        """Exceptions propagate: there are no other ranks to stop."""
        yield


class MPIComm(LocalComm):
    """K > 1 ranks of an mpi4py communicator."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        super().__init__()
        self._mpi = MPI
        self._comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def sum_inplace(self, buf: np.ndarray) -> np.ndarray:
        if not buf.flags.c_contiguous:
            raise ValueError("sum_inplace needs a C-contiguous array")
        t0 = time.perf_counter()
        self._comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        self.seconds += time.perf_counter() - t0
        return buf

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        local = np.ascontiguousarray(local)
        out = np.empty((self.size * local.shape[0],) + local.shape[1:], dtype=local.dtype)
        t0 = time.perf_counter()
        self._comm.Allgather(local, out)
        self.seconds += time.perf_counter() - t0
        return out

    def allgather(self, obj: Any) -> List[Any]:
        return self._comm.allgather(obj)

    def bcast(self, obj: Any) -> Any:
        return self._comm.bcast(obj, root=0)

    def barrier(self) -> None:
        self._comm.Barrier()

    def check_same(self, settings: Mapping[str, Any]) -> None:
        expected = self.bcast(dict(settings))
        differ = [f"{k}={settings.get(k)!r} (rank 0: {expected.get(k)!r})"
                  for k in sorted(set(settings) | set(expected)) if settings.get(k) != expected.get(k)]
        if differ:
            raise ValueError(f"rank {self.rank} was started with other settings than rank 0: "
                             f"{', '.join(differ)}; every rank must get the same arguments")

    def check_identical(self, arr: np.ndarray, what: str) -> None:
        digests = self.allgather(zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")))
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise RuntimeError(f"{what} differ between MPI ranks: rank(s) {differ} hold other values "
                               f"than rank 0")

    @contextmanager
    def fail_fast(self) -> Iterator[None]:
        """An exception on this rank prints ``rank N failed: ...`` and aborts the whole job
        (the other ranks would otherwise wait forever in their next collective call)."""
        try:
            yield
        except SystemExit as e:
            if e.code in (None, 0):
                raise
            self._abort(str(e.code), None)
        except BaseException as e:  # Ctrl-C too: the other ranks must stop as well
            plain = isinstance(e, USER_ERRORS + (KeyboardInterrupt,))  # no traceback needed
            self._abort(f"{type(e).__name__}: {e}", None if plain else e)

    def _abort(self, message: str, error: Optional[BaseException]) -> None:
        if error is not None:
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        print(f"dlmone: rank {self.rank} failed: {message}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        self._comm.Abort(1)


def launched_size() -> int:
    """The number of ranks an MPI launcher (or srun) started, from its environment; 1 if none."""
    for var in LAUNCHER_SIZE_VARS:
        value = os.environ.get(var)
        if value:
            return int(value)
    return 1


_world: Optional[LocalComm] = None


def world() -> LocalComm:
    """The communicator of this launch (created once). mpi4py is imported, and MPI
    initialised, only when a launcher started more than one rank."""
    global _world
    if _world is None:
        size = launched_size()
        if size <= 1:
            _world = LocalComm()
        else:
            try:
                import mpi4py
            except ImportError:
                raise RuntimeError(f"started as one of {size} MPI ranks, but mpi4py is not installed: "
                                   f"pip install 'dlmone[mpi]' (or run without mpirun)") from None
            mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI
            from mpi4py import MPI
            _world = MPIComm(MPI.COMM_WORLD) if MPI.COMM_WORLD.Get_size() > 1 else LocalComm()
    return _world
