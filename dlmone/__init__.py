"""dlmone: DLM-One one-step sequence generation from continuous diffusion LMs, C core."""
from __future__ import annotations

import ctypes as _ctypes
import os as _os
import warnings as _warnings

import scipy_openblas32 as _blas

# Load the BLAS the core links against globally, so the extension finds it even when
# its rpath does not (a wheel moved to another site-packages).
try:
    _ctypes.CDLL(_os.path.join(_blas.get_lib_dir(), f"lib{_blas.get_library()}.so"),
                 mode=_ctypes.RTLD_GLOBAL)
except OSError:  # the rpath still applies; the import below reports real failures
    pass

from . import _core  # noqa: E402
from ._version import __version__  # noqa: E402
from .model import DiffusionTransformer, ModelConfig  # noqa: E402
from .optim import EMA, AdamW  # noqa: E402
from .api import load  # noqa: E402


def from_diffuseq(checkpoint, training_args, vocab, num_heads=None):
    """Load a DiffuSeq teacher (torch state dict + training_args.json + vocab.txt);
    see :func:`dlmone.diffuseq_import.from_diffuseq`."""
    from .diffuseq_import import from_diffuseq as _impl
    return _impl(checkpoint, training_args, vocab, num_heads)


def build_info() -> dict:
    """How the C core was built: OpenMP, BLAS, compiler flags, thread count."""
    return _core.build_info()


def set_num_threads(n: int) -> None:
    """Number of OpenMP threads used by every C kernel (default: OMP_NUM_THREADS or all cores)."""
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    return _core.get_num_threads()


if not _core.build_info()["openmp"]:
    _warnings.warn("dlmone was built without OpenMP: every kernel runs single-threaded",
                   RuntimeWarning, stacklevel=2)

__all__ = ["DiffusionTransformer", "ModelConfig", "AdamW", "EMA", "load", "from_diffuseq", "build_info",
           "set_num_threads", "get_num_threads", "__version__"]
