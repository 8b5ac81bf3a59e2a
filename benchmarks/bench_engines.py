"""Issue 15 item 3: the product engine chosen by measurement, at the model's shapes.

Every product of a training step of issue 15's two shapes (small: E 128, H 256, F 1024,
V 16000; base: DiffuSeq's 768 / 3072 / 30522; M = 2048 token rows, the tied head at 512
rows) in its three orientations (forward y = x Wᵀ, dx = dy W, dW = dyᵀ x), float32 and
bf16 (float32 accumulation), GFLOP/s side by side in one run, same thread count:

- **dlmone**: ``dlmone._core.matmul`` (float32: the fixed tile plan over single-threaded
  scipy-openblas32 blocks; bf16: the AMX kernel of csrc/core/amx.c, float32 inputs
  converted and packed inside the call, as the network calls it);
- **OpenBLAS**: scipy-openblas32's ``cblas_sgemm`` with its own threads (the library dlmone
  links, which dlmone keeps single-threaded: the threads are set around each call);
- **MKL** (``pip install mkl``): ``cblas_sgemm`` and ``cblas_gemm_bf16bf16f32``;
- **oneDNN** (``pip install onednn``): ``dnnl_sgemm`` and ``dnnl_gemm_bf16bf16f32``;
- **torch**: ``torch.mm`` (the engines PyTorch's CPU build calls: MKL for float32,
  oneDNN for bf16).

The bf16 inputs of MKL, oneDNN and torch are converted before timing (to their
advantage). Engines that are not installed are left out, with a note. libxsmm (Debian's
libxsmm-dev 1.17) is not measured: it is a library of small-product kernels (it JITs
products up to 64³ by default and hands larger ones to the BLAS it is linked with), and
Debian ships it only as static archives.

  LD_LIBRARY_PATH=$(python -c 'import sys; print(sys.prefix)')/lib \\
      python benchmarks/bench_engines.py --threads 2 --out benchmarks/results/engines.json
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from common import interleaved, machine_info, write_json_atomic  # noqa: E402

SHAPES = {
    "small": dict(E=128, H=256, F=1024, V=16000),
    "base": dict(E=768, H=768, F=3072, V=30522),
}
ROWS, HEAD_ROWS = 2048, 512
CblasRowMajor, CblasNoTrans, CblasTrans = 101, 111, 112


def layer_shapes(s: Dict[str, int]) -> List[Tuple[str, int, int, int]]:
    """(name, rows M, in K, out N) of the per-token linear layers and the tied head."""
    E, H, F, V = s["E"], s["H"], s["F"], s["V"]
    shapes = [("qkv", ROWS, H, 3 * H), ("attn_out", ROWS, H, H), ("ffn_up", ROWS, H, F), ("ffn_down", ROWS, F, H)]
    if E != H:
        shapes += [("up_proj", ROWS, E, H), ("down_proj", ROWS, H, E)]
    return shapes + [("tied_head", HEAD_ROWS, E, V)]


def orientations(M: int, K: int, N: int):
    """(name, m, n, k, trans_a, trans_b, a shape, b shape) of a linear layer's 3 products."""
    return [("forward", M, N, K, False, True, (M, K), (N, K)),     # y = x W^T
            ("dx", M, K, N, False, False, (M, N), (N, K)),          # dx = dy W
            ("dW", N, K, M, True, False, (M, N), (M, K))]           # dW = dy^T x


def to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as the engines' own conversions."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class Engines:
    """The engines found on this machine, each a maker of product callables."""

    def __init__(self, threads: int) -> None:
        self.notes: Dict[str, str] = {}
        self.threads = threads
        self.openblas = self._load_openblas()
        self.mkl = self._load("mkl", "libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")
        if self.mkl is not None:
            self.mkl.MKL_Set_Num_Threads(ctypes.c_int(threads))
        self.dnnl = self._load("onednn", "libdnnl.so.3", "libdnnl.so")
        try:
            import torch
            torch.set_num_threads(threads)
            self.torch = torch
        except ImportError as e:
            self.torch, self.notes["torch"] = None, str(e)

    @staticmethod
    def _load_openblas():
        import scipy_openblas32 as so
        return ctypes.CDLL(os.path.join(so.get_lib_dir(), f"lib{so.get_library()}.so"))

    def _openblas_threads(self, n: int) -> None:
        """dlmone runs this same library single-threaded inside its OpenMP blocks (set at
        import): the OpenBLAS column gets its threads for its own calls only."""
        self.openblas.scipy_openblas_set_num_threads(ctypes.c_int(n))

    def _load(self, name: str, *sonames: str):
        errors = []
        for d in (os.path.join(sys.prefix, "lib"), ""):
            for so in sonames:
                try:
                    return ctypes.CDLL(os.path.join(d, so) if d else so, mode=ctypes.RTLD_GLOBAL)
                except OSError as e:
                    errors.append(str(e))
        self.notes[name] = f"not measured: {errors[0]} (pip install {name}; LD_LIBRARY_PATH=sys.prefix/lib)"
        return None

    def callables(self, m: int, n: int, k: int, ta: bool, tb: bool, a: np.ndarray, b: np.ndarray,
                  bf16: bool) -> Dict[str, Callable[[], None]]:
        from dlmone import _core

        lda, ldb = a.shape[1], b.shape[1]
        c = np.empty((m, n), np.float32)
        P = ctypes.POINTER
        f32p = lambda x: x.ctypes.data_as(P(ctypes.c_float))  # noqa: E731
        fns: Dict[str, Callable[[], None]] = {"dlmone": lambda: _core.matmul(a, b, ta, tb, bf16)}
        tA, tB = (CblasTrans if ta else CblasNoTrans), (CblasTrans if tb else CblasNoTrans)
        if not bf16:
            fns["OpenBLAS"] = lambda: self._openblas_threads(self.threads) or self.openblas.scipy_cblas_sgemm(
                CblasRowMajor, tA, tB, m, n, k, ctypes.c_float(1.0), f32p(a), lda, f32p(b), ldb,
                ctypes.c_float(0.0), f32p(c), n)
        if self.mkl is not None:
            if bf16:
                a16, b16 = to_bf16(a), to_bf16(b)
                u16p = lambda x: x.ctypes.data_as(P(ctypes.c_uint16))  # noqa: E731
                fns["MKL"] = lambda: self.mkl.cblas_gemm_bf16bf16f32(
                    CblasRowMajor, tA, tB, m, n, k, ctypes.c_float(1.0), u16p(a16), lda, u16p(b16), ldb,
                    ctypes.c_float(0.0), f32p(c), n)
            else:
                fns["MKL"] = lambda: self.mkl.cblas_sgemm(
                    CblasRowMajor, tA, tB, m, n, k, ctypes.c_float(1.0), f32p(a), lda, f32p(b), ldb,
                    ctypes.c_float(0.0), f32p(c), n)
        if self.dnnl is not None:
            ch = lambda t: ctypes.c_char(b"T" if t else b"N")  # noqa: E731
            i64 = ctypes.c_int64
            if bf16:
                a16, b16 = to_bf16(a), to_bf16(b)
                fns["oneDNN"] = lambda: self.dnnl.dnnl_gemm_bf16bf16f32(
                    ch(ta), ch(tb), i64(m), i64(n), i64(k), ctypes.c_float(1.0), a16.ctypes.data_as(ctypes.c_void_p),
                    i64(lda), b16.ctypes.data_as(ctypes.c_void_p), i64(ldb), ctypes.c_float(0.0), f32p(c), i64(n))
            else:
                fns["oneDNN"] = lambda: self.dnnl.dnnl_sgemm(
                    ch(ta), ch(tb), i64(m), i64(n), i64(k), ctypes.c_float(1.0), f32p(a), i64(lda), f32p(b),
                    i64(ldb), ctypes.c_float(0.0), f32p(c), i64(n))
        for name in ("OpenBLAS", "MKL", "oneDNN"):  # these write into c: return it
            if name in fns:
                fns[name] = (lambda f: lambda: (f(), c)[1])(fns[name])
        if "OpenBLAS" in fns:  # back to dlmone's single-threaded OpenBLAS after each call
            fns["OpenBLAS"] = (lambda f: lambda: (f(), self._openblas_threads(1))[0])(fns["OpenBLAS"])
        if self.torch is not None:
            torch = self.torch
            dt = torch.bfloat16 if bf16 else torch.float32
            A, B = torch.from_numpy(a).to(dt), torch.from_numpy(b).to(dt)
            A, B = (A.t() if ta else A), (B.t() if tb else B)
            fns["torch"] = lambda: torch.mm(A, B)
        return fns

    @staticmethod
    def check(fns: Dict[str, Callable[[], None]], want: np.ndarray, bf16: bool) -> None:
        """Every engine computes the product (to bf16's or float32's precision)."""
        for name, fn in fns.items():
            out = fn()  # the ctypes engines return their output array c
            got = out.float().numpy() if hasattr(out, "float") else np.asarray(out)
            err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))
            if err > (2e-2 if bf16 else 1e-4):
                raise AssertionError(f"{name} product is wrong: relative error {err:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shapes", default="small,base")
    p.add_argument("--out", default="benchmarks/results/engines.json")
    args = p.parse_args()

    import dlmone
    dlmone.set_num_threads(args.threads)
    eng = Engines(args.threads)
    precisions = (False, True) if dlmone.build_info()["amx_bf16"] else (False,)
    if len(precisions) == 1:
        eng.notes["bf16"] = "not measured: no AMX-BF16 on this CPU (dlmone's bf16 products need it)"
    rng = np.random.default_rng(0)
    results = []
    for preset in args.shapes.split(","):
        for layer, M, K, N in layer_shapes(SHAPES[preset]):
            for orient, m, n, k, ta, tb, ashape, bshape in orientations(M, K, N):
                a = rng.standard_normal(ashape, dtype=np.float32)
                b = rng.standard_normal(bshape, dtype=np.float32) * np.float32(1 / np.sqrt(k))
                want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
                for bf16 in precisions:
                    fns = eng.callables(m, n, k, ta, tb, a, b, bf16)
                    eng.check(fns, want, bf16)
                    t = interleaved(fns, reps=args.reps, warmup=2, min_block_s=0.05, settle_s=0.05)
                    gflops = {e: 2.0 * m * n * k / t[e].median / 1e9 for e in fns}
                    best_other = max((v, e) for e, v in gflops.items() if e != "dlmone")
                    row = {"preset": preset, "layer": layer, "orientation": orient, "m": m, "n": n, "k": k,
                           "precision": "bf16" if bf16 else "float32", "gflops": gflops,
                           "best_other": best_other[1], "ratio_vs_best_other": gflops["dlmone"] / best_other[0]}
                    results.append(row)
                    print(f"{preset:<6}{layer:<11}{orient:<8}{row['precision']:<8}" +
                          "".join(f"{e} {v:7.1f}  " for e, v in gflops.items()) +
                          f"dlmone/{best_other[1]} {row['ratio_vs_best_other']:.2f}", flush=True)
    # per preset and precision: the summed time of the products of one step, per engine
    summary = {}
    for preset in args.shapes.split(","):
        for prec in ("bf16" if bf16 else "float32" for bf16 in precisions):
            rows = [r for r in results if r["preset"] == preset and r["precision"] == prec]
            engines = set.intersection(*(set(r["gflops"]) for r in rows))
            secs = {e: sum(2.0 * r["m"] * r["n"] * r["k"] / (r["gflops"][e] * 1e9) for r in rows) for e in engines}
            summary[f"{preset} {prec}"] = {e: secs["dlmone"] / s for e, s in secs.items()}
    print(f"\nall products above, summed: each engine's speed relative to dlmone (dlmone's time / the engine's; "
          f"> 1: faster than dlmone), {args.threads} threads")
    for key, ratios in summary.items():
        print(f"{key:<16}" + "  ".join(f"{e} {v:.2f}" for e, v in sorted(ratios.items())))
    for name, note in eng.notes.items():
        print(f"{name}: {note}")
    write_json_atomic(args.out, {"machine": machine_info(), "threads": args.threads, "notes": eng.notes,
                                 "rows": results, "summary_speed_relative_to_dlmone": summary})


if __name__ == "__main__":
    main()
