"""The C core under valgrind memcheck: a short real pipeline, then a verdict.

    python tools/valgrind_check.py            # 3 to 5 minutes on 2 cores

runs itself again under

    PYTHONMALLOC=malloc valgrind --tool=memcheck --track-origins=yes --xml=yes ...

(PYTHONMALLOC=malloc: CPython's own allocator would hide dlmone's buffers from
memcheck) and reads valgrind's XML report. It runs a copy of the package whose
extension is built in a temp folder with -g (file:line) and without DLMONE_NATIVE:
valgrind does not decode AVX-512 and its virtual CPU has none, so the run-time dispatch
picks the core's AVX2 build (or the baseline one).

The workload trains a tiny teacher (dropout, gradient accumulation, the loss-aware
sampler, checkpoints), generates with DDIM and the ancestral sampler, distils both
stages with the linear discriminator head and generates with the student, on two
OpenMP threads (the teacher part for both layouts: E != H with projections, E == H
without): the C code of the network, its backward pass, the losses, the samplers and
the optimiser all run. An error with dlmone's _core on its stack or on the stack
where its memory came from (invalid read/write, use of uninitialised values, bad
free) fails the check (exit 1) and is printed; errors elsewhere (the interpreter) are
counted by place. Leak checking is off: a Python process frees little at exit, and
the flat-RSS test in tests/test_reliability.py watches for leaks instead.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent


def workload(out: Path) -> None:
    import warnings

    import dlmone
    from dlmone.builtin_task import make_builtin_task
    from dlmone.data import Seq2SeqData
    from dlmone.distill import DistillConfig, distill
    from dlmone.teacher import TeacherConfig, train_teacher

    dlmone.set_num_threads(2)
    data = Seq2SeqData.from_pairs(**make_builtin_task(n_train=48, n_valid=8, n_test=4))
    sources = [s for s, _ in data.test]
    layouts = {"proj": dict(emb_dim=8, hidden_dim=12, num_heads=3),
               "same": dict(emb_dim=12, hidden_dim=12, num_heads=2)}
    for name, dims in layouts.items():
        model = dict(dims, num_layers=2, ffn_dim=24, time_dim=6, dropout=0.1)
        config = TeacherConfig(preset="tiny", model=model, seq_len=16, vocab_size=80, diffusion_steps=10,
                               steps=3, batch_size=4, grad_accum=2, warmup=1, weight_decay=0.01, eval_every=3,
                               save_every=2, eval_size=4, eval_samples=2, eval_sample_steps=2, log_every=1)
        teacher = train_teacher(config, data, out / name / "teacher", progress=False, print_fn=lambda s: None)
        teacher.generate(sources, steps=3, method="ddim", num_candidates=2)
        teacher.generate(sources[:2], method="ancestral", clamp=False)
        if name == "same":
            continue  # the distillation code does not depend on the layout
        dconfig = DistillConfig(t_init=7, t_max=9, steps=2, batch_size=4, eval_every=2, eval_size=4, log_every=1,
                                save_every=1, disc_head="linear", lr_g=1e-3, lr_psi=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # degeneration warnings of a 2-step student
            student = distill(out / name / "teacher" / "teacher", data, dconfig, out / name / "student",
                              progress=False, print_fn=lambda s: None)
        student.generate(sources, steps=1)
        student.generate(sources, steps=3, num_candidates=2)


def build_portable(dest: Path) -> None:
    """Copy the package to ``dest`` and build its extension there (default build, -g)."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "csrc", dest / "csrc")
    shutil.copytree(REPO / "dlmone", dest / "dlmone", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "DLMONE_NATIVE"}
    env["CFLAGS"] = "-g"
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def in_core(error: ET.Element) -> bool:
    return any("dlmone/_core" in (frame.findtext("obj") or "") for frame in error.iter("frame"))


def describe(error: ET.Element) -> str:
    what = error.findtext("what") or error.findtext("xwhat/text") or error.findtext("kind") or "?"
    stack = error.find("stack")
    frames = []
    for frame in (list(stack)[:8] if stack is not None else []):
        fn = frame.findtext("fn") or frame.findtext("obj") or "?"
        where = f"{frame.findtext('file')}:{frame.findtext('line')}" if frame.findtext("file") else ""
        frames.append(f"    {fn} {where}".rstrip())
    return "\n".join([what] + frames)


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", metavar="DIR", help=argparse.SUPPRESS)  # the part run under valgrind
    args = p.parse_args(argv)
    if args.workload:
        workload(Path(args.workload))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        package, runs = Path(tmp) / "package", Path(tmp) / "runs"
        package.mkdir()
        build_portable(package)
        report = Path(tmp) / "memcheck.xml"
        cmd = ["valgrind", "--tool=memcheck", "--track-origins=yes", "--leak-check=no", "--xml=yes",
               f"--xml-file={report}", "--num-callers=30", sys.executable, __file__, "--workload", str(runs)]
        env = dict(os.environ, PYTHONMALLOC="malloc", PYTHONPATH=str(package))
        run = subprocess.run(cmd, env=env, cwd=tmp)
        # leak records come with the report even without leak checking; see the docstring
        errors = [e for e in ET.parse(report).getroot().findall("error")
                  if not (e.findtext("kind") or "").startswith("Leak_")]
    ours = [e for e in errors if in_core(e)]
    print(f"valgrind memcheck: workload exit {run.returncode}; {len(errors)} errors, "
          f"{len(ours)} with dlmone._core on the stack")
    for e in ours:
        print(describe(e))
    others: dict = {}
    for e in errors:
        if not in_core(e):
            top = next(iter(e.iter("frame")), None)
            key = (e.findtext("kind"), top.findtext("fn") if top is not None else "?",
                   os.path.basename(top.findtext("obj") or "") if top is not None else "?")
            others[key] = others.get(key, 0) + 1
    for (kind, fn, obj), n in sorted(others.items(), key=lambda kv: -kv[1]):
        print(f"  outside dlmone._core: {n} x {kind} in {fn} ({obj})")
    return 1 if ours or run.returncode else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
