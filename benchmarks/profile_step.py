"""A steady loop of training steps (forward + backward + AdamW) to profile with perf:

  perf record -g -o perf.data python benchmarks/profile_step.py --preset small --steps 60
  perf report -i perf.data --no-children --sort dso      # or --sort symbol

It also prints dlmone's own per-kernel timers (dlmone._core.profile()).
"""
import argparse
import time

import numpy as np

import dlmone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=dlmone.ModelConfig.PRESETS)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    cfg = dlmone.ModelConfig.preset(args.preset, seq_len=args.seq_len, dropout=0.0)
    model = dlmone.DiffusionTransformer(cfg)
    opt = dlmone.AdamW(model, lr=1e-4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.seq_len, cfg.emb_dim)).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.integers(0, cfg.diffusion_steps, args.batch)
    for _ in range(5):
        model.forward(x, t, train=True)
        model.backward(gy)
    dlmone._core.set_profiling(True)
    dlmone._core.profile(reset=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        model.zero_grad()
        model.forward(x, t, train=True)
        model.backward(gy)
        opt.step()
    dt = (time.perf_counter() - t0) / args.steps
    cpu = (time.process_time() - c0) / args.steps
    print(f"{args.preset}: {dt * 1e3:.1f} ms per step, {args.batch * args.seq_len / dt:,.0f} tokens/s, "
          f"{cpu * 1e3:.1f} ms CPU per step (all threads)")
    kernels = sorted(dlmone._core.profile().items(), key=lambda kv: -kv[1][1])
    timed = sum(sec for _, sec in (v for _, v in kernels))
    print(f"{'kernel':<20}{'calls/step':>11}{'ms/step':>9}{'share':>7}")
    for name, (calls, sec) in kernels:
        print(f"{name:<20}{calls / args.steps:>11.0f}{sec / args.steps * 1e3:>9.2f}{sec / args.steps / dt:>7.1%}")
    print(f"{'(outside kernels)':<20}{'':>11}{(dt - timed / args.steps) * 1e3:>9.2f}{1 - timed / args.steps / dt:>7.1%}")


if __name__ == "__main__":
    main()
