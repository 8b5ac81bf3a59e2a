"""Build dlmone._core: pure C kernels in csrc/core/, the CPython + NumPy bindings in
csrc/py/, OpenMP, CBLAS.

By default the build runs on any x86-64-v2 CPU and is as fast as -march=native on newer
ones: csrc/core is compiled once per level in ISA_LEVELS (SSE4.2, AVX2 + FMA, AVX-512)
with its global symbols renamed name__<level>, and a generated file defines each entry
point as an ifunc that picks the best level the CPU supports when the extension loads
(csrc/core/isa.h); DLMONE_ISA=baseline|avx2 at run time caps the level. The bindings
and the rest are compiled for x86-64-v2.

Environment switches:
  DLMONE_NATIVE=1     one build of everything with -march=native (local builds only)
  DLMONE_NO_OPENMP=1  build single-threaded even if the compiler has OpenMP
  DLMONE_SANITIZE=1   -fsanitize=address,undefined -O1 -g (the CI's ASan build)
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import scipy_openblas32
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


# Levels of the run-time dispatch, in csrc/core/isa.h's order: (name, -march). The first
# is the floor: everything outside the dispatched core is compiled for it.
ISA_LEVELS = [("baseline", "x86-64-v2"), ("avx2", "x86-64-v3"), ("avx512", "x86-64-v4")]
# csrc/core files compiled once: isa.c runs in the resolvers, profile.c holds shared state.
CORE_ONCE = ["csrc/core/isa.c", "csrc/core/profile.c"]

# The toolchain and the loader must know the levels and ifuncs (GCC >= 12 and glibc;
# musl has no ifunc), so this probe is run, not only built (for the build machine's
# default target: it must run on any CPU).
LEVELS_PROBE = """
static int answer(void) { return 0; }
static int (*resolve(void))(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") ? answer : answer;
}
__attribute__((ifunc("resolve"))) int dispatched(void);
int main(void) { return dispatched(); }
"""


def _compiles(compiler, flags, source="int main(void){return 0;}\n", run=False):
    """True if `compiler` builds and links `source` with `flags` (and it exits 0, if `run`)."""
    tmp = tempfile.mkdtemp()
    try:
        src, exe = os.path.join(tmp, "probe.c"), os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(source)
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if subprocess.run([compiler, src, "-o", exe] + flags, **quiet).returncode != 0:
            return False
        return not run or subprocess.run([exe], **quiet).returncode == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tool(cc, name):
    """The binutils program `name` beside the compiler (cross toolchains prefix it)."""
    prefixed = cc[:-len("gcc")] + name if cc.endswith("gcc") else name
    return prefixed if shutil.which(prefixed) else name


class BuildCore(build_ext):
    def build_extensions(self):
        cc = self.compiler.compiler_so[0]
        ext = self.extensions[0]
        # -fno-trapping-math: without it GCC will not if-convert the selects in mathfun.h's
        # exp/erf/tanh (an arm might raise an FP exception), so every loop that calls them
        # (GELU, softmax, cross-entropy) stays scalar. It changes no result: nothing here
        # unmasks FP traps, and unlike -ffast-math it neither reassociates nor flushes
        # subnormals.
        flags = ["-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-Wall",
                 "-Wno-unknown-pragmas"]
        native = os.environ.get("DLMONE_NATIVE", "0") == "1"
        levels = _compiles(cc, ["-march=" + ISA_LEVELS[-1][1]]) and _compiles(cc, [], LEVELS_PROBE, run=True)
        if levels:
            ext.define_macros.append(("DLMONE_CPU_LEVELS", "1"))
        dispatch = not native and levels
        if dispatch:
            flags.append("-march=" + ISA_LEVELS[0][1])
            ext.define_macros.append(("DLMONE_DISPATCH", "1"))
        elif native and _compiles(cc, ["-march=native"]):
            flags.append("-march=native")
            ext.define_macros.append(("DLMONE_ISA_FIXED", '"native"'))
        else:
            print("dlmone: no run-time ISA dispatch (%s); building for the compiler's default target"
                  % ("no -march=native" if native else "the toolchain lacks x86-64 levels or ifunc"),
                  file=sys.stderr)
            ext.define_macros.append(("DLMONE_ISA_FIXED", '"generic"'))
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
        if dispatch:
            self._build_core_levels(ext, cc, [f for f in flags if not f.startswith("-march=")])
        super().build_extensions()

    def _build_core_levels(self, ext, cc, flags):
        """Compile the dispatched part of csrc/core once per ISA level, rename its global
        symbols name__<level>, and generate the ifuncs that pick among them."""
        core = [s for s in sorted(glob.glob("csrc/core/*.c")) if s not in CORE_ONCE]
        nm, objcopy = _tool(cc, "nm"), _tool(cc, "objcopy")
        entry_points, level_objects = None, []
        for level, march in ISA_LEVELS:
            out_dir = os.path.join(self.build_temp, "isa-" + level)
            macros = ext.define_macros + [("DLMONE_LEVEL_" + level.upper(), "1")]
            objects = self.compiler.compile(core, output_dir=out_dir, macros=macros,
                                            include_dirs=ext.include_dirs, extra_postargs=flags + ["-march=" + march],
                                            depends=ext.depends)
            listing = subprocess.run([nm, "-g", "--defined-only", "--format=posix"] + objects,
                                     check=True, capture_output=True, text=True).stdout
            symbols = sorted(line.split()[:2] for line in listing.splitlines() if line and not line.endswith(":"))
            not_code = [name for name, kind in symbols if kind not in "TW"]
            if not_code:
                raise RuntimeError("dlmone: %s define global data %s; each ISA level would get its own "
                                   "copy: move it to a file in CORE_ONCE" % (", ".join(core), not_code))
            names = [name for name, _ in symbols]
            if entry_points is None:
                entry_points = names
            elif names != entry_points:
                raise RuntimeError("dlmone: the %s build of csrc/core defines other symbols" % level)
            renames = os.path.join(out_dir, "renames.txt")
            with open(renames, "w") as f:
                f.writelines("%s %s__%s\n" % (name, name, level) for name in names)
            for obj in objects:
                renamed = obj[:-len(".o")] + "." + level + ".o"
                subprocess.run([objcopy, "--redefine-syms=" + renames, obj, renamed], check=True)
                level_objects.append(renamed)
        dispatch = os.path.join(self.build_temp, "isa-dispatch.c")
        text = ("/* Generated by setup.py: the entry points of csrc/core, dispatched (isa.h). */\n"
                '#include "isa.h"\n\n' + "".join("DL_DISPATCH(%s)\n" % name for name in entry_points))
        if not os.path.exists(dispatch) or open(dispatch).read() != text:
            with open(dispatch, "w") as f:
                f.write(text)
        # (idempotent: setuptools may run build_ext twice in one process)
        ext.sources = [s for s in ext.sources if s not in core and s != dispatch] + [dispatch]
        ext.extra_objects = [o for o in ext.extra_objects if o not in level_objects] + level_objects
        ext.depends = [d for d in ext.depends if d not in level_objects] + level_objects


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
