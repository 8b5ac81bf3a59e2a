"""Build dlmone._core: pure C kernels in csrc/core/, the CPython + NumPy bindings in
csrc/py/, OpenMP, CBLAS.

Environment switches:
  DLMONE_PORTABLE=1   no -march=native (for wheels that run on any x86-64)
  DLMONE_NO_OPENMP=1  build single-threaded even if the compiler has OpenMP
  DLMONE_SANITIZE=1   -fsanitize=address,undefined -O1 -g (the CI's ASan build)
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
import scipy_openblas32
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _compiles(compiler, flags, source="int main(void){return 0;}\n"):
    """True if `compiler` builds and links `source` with `flags`."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        cmd = [compiler, src, "-o", os.path.join(tmp, "probe")] + flags
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildCore(build_ext):
    def build_extensions(self):
        cc = self.compiler.compiler_so[0]
        ext = self.extensions[0]
        flags = ["-O3", "-std=gnu11", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
        portable = os.environ.get("DLMONE_PORTABLE", "0") == "1"
        if not portable and _compiles(cc, ["-march=native"]):
            flags.append("-march=native")
        if os.environ.get("DLMONE_SANITIZE", "0") == "1":
            flags = [f for f in flags if f != "-O3"] + ["-O1", "-g", "-fno-omit-frame-pointer",
                                                        "-fsanitize=address,undefined"]
            ext.extra_link_args.append("-fsanitize=address,undefined")
        omp_src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
        use_omp = os.environ.get("DLMONE_NO_OPENMP", "0") != "1" and _compiles(cc, ["-fopenmp"], omp_src)
        if use_omp:
            flags.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        else:
            print("dlmone: building without OpenMP (single-threaded)", file=sys.stderr)
        amx_src = ("#include <immintrin.h>\n__attribute__((target(\"amx-tile,amx-bf16\"))) "
                   "void f(void){_tile_zero(0);}\nint main(void){return 0;}\n")
        if _compiles(cc, [], amx_src):
            ext.define_macros.append(("DLMONE_HAVE_AMX", "1"))
        else:
            print("dlmone: compiler lacks AMX intrinsics; bf16 inference disabled", file=sys.stderr)
        ext.extra_compile_args = flags
        ext.define_macros.append(("DLMONE_CFLAGS", '"%s"' % " ".join(flags)))
        super().build_extensions()


blas_lib_dir = scipy_openblas32.get_lib_dir()
core = Extension(
    "dlmone._core",
    sources=sorted(glob.glob("csrc/core/*.c")) + sorted(glob.glob("csrc/py/*.c")),
    depends=sorted(glob.glob("csrc/core/*.h")) + sorted(glob.glob("csrc/py/*.h")),
    include_dirs=[np.get_include(), scipy_openblas32.get_include_dir(), "csrc/core", "csrc/py"],
    library_dirs=[blas_lib_dir],
    libraries=[scipy_openblas32.get_library()],
    # The BLAS lives in the scipy_openblas32 package beside dlmone in site-packages;
    # the absolute path serves editable installs, dlmone/__init__ also preloads it.
    runtime_library_dirs=["$ORIGIN/../scipy_openblas32/lib", blas_lib_dir],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                   ("BLAS_SYMBOL_PREFIX", "scipy_")],
    extra_link_args=[],
)

setup(ext_modules=[core], cmdclass={"build_ext": BuildCore})
