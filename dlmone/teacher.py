"""The teacher: a DiffuSeq-style diffusion LM. Training (SPEC §5) and sampling; saving
and loading come from the generator base class (:mod:`dlmone.generator`).

``train_teacher(config, data, out_dir)`` trains with AdamW, warm-up and linear decay,
EMA, gradient accumulation and periodic validation; it checkpoints everything needed
for an exact resume into ``out_dir/checkpoints/step-N`` and the EMA teacher into
``out_dir/teacher``. ``Teacher.load(out_dir/teacher).generate(sources)`` samples.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from . import checkpoint as ckpt
from . import get_num_threads
from .checkpoint import PathLike
from .config_io import RunConfig
from .data import Seq2SeqData, encode_pairs
from .diffusion import Diffusion, derive_seed, make_timestep_sampler, training_loss
from .distributed import LocalComm, world
from .generator import SequenceModel
from .baselines import tokenizer_protocol
from .metrics import bleu
from .model import DiffusionTransformer, ModelConfig
from .optim import EMA, AdamW, NonFiniteGuard
from .resources import check_memory, estimate_memory, parse_bytes
from .runlog import JsonlLog, NullLog, discard
from .sample import batched, teacher_sample
from .threads import ThreadGovernor
from .tokenizer import Tokenizer


#: The recipe a preset's teacher trains with unless told otherwise: TeacherConfig fields
#: (``model`` holds ModelConfig fields), applied under everything the user gives by
#: :meth:`TeacherConfig.for_preset` and ``dlmone train-teacher``. ``small``: issue 13's
#: budget study on QQP (RESULTS.md §13): the soft absorbing state, uniform t, no dropout.
PRESET_RECIPES: Dict[str, Dict[str, Any]] = {
    "small": {"vocab_size": 6000, "lr": 1e-3, "warmup": 500, "timestep_sampler": "uniform",
              "soft_absorb": 0.5, "model": {"dropout": 0.0}},
}


def with_recipe(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """``fields`` (TeacherConfig's, as a dict) over the recipe of their preset."""
    recipe = PRESET_RECIPES.get(fields.get("preset", "tiny"), {})
    out = {**recipe, **fields}
    out["model"] = {**recipe.get("model", {}), **dict(fields.get("model", {}))}
    return out


@dataclass
class TeacherConfig(RunConfig):
    """Everything that defines a teacher run. ``model`` overrides fields of the preset.

    The recipe options of SPEC §5.1, all reachable with ``--set``:

    - ``ema_warmup``: EMA decay min(ema_decay, (1+s)/(10+s)) at optimiser step s
      (:func:`dlmone.optim.ema_decay_at`), so that a short run's EMA forgets the random
      initialisation. On by default.
    - ``model.dropout`` (the preset's otherwise; 0 suits short, under-fitted runs) and
      ``timestep_sampler`` (``"uniform"`` or DiffuSeq's ``"lossaware"``).
    - ``model.self_conditioning``: self-conditioning (:class:`dlmone.ModelConfig`); trained
      on half of the examples (:func:`dlmone.diffusion.training_loss`), the samplers feed
      the previous step's x̂0.
    - ``soft_absorb``: DiffuSeq-v2's soft absorbing state, the rate of its discrete
      noise (0 = off; DiffuSeq-v2's scripts use 0.5); the model then gets a learned
      [MASK] vector (``mask_embedding``).
    """

    preset: str = "tiny"
    model: Dict[str, Any] = field(default_factory=dict)
    seq_len: int = 32
    vocab_size: int = 1000          # size of the WordPiece vocabulary trained on train
    vocab_file: Optional[str] = None  # or a BERT vocab.txt (then vocab_size is its size)
    diffusion_steps: int = 2000
    batch_size: int = 64
    grad_accum: int = 1
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    timestep_sampler: str = "lossaware"
    soft_absorb: float = 0.0
    precision: str = "float32"    # or "bf16": mixed-precision products on AMX (DiffusionTransformer.precision)
    adaptive_threads: bool = True  # the thread count chosen by measured step times (dlmone.threads)
    log_every: int = 20
    eval_every: int = 500
    eval_size: int = 256
    eval_samples: int = 4         # generated examples shown at every validation
    eval_sample_steps: int = 20   # DDIM steps for those
    eval_bleu: int = 0            # validation pairs scored by BLEU (generate's protocol) at every validation; 0 = off
    eval_bleu_steps: int = 100    # DDIM steps (clamped) for that BLEU
    save_every: int = 1000
    keep_checkpoints: int = 2
    train_limit: Optional[int] = None
    max_bad_steps: int = 10       # consecutive non-finite steps before training stops
    seed: int = 0
    max_memory: Optional[Union[int, str]] = None  # bytes or "8GiB"; default: what is available

    def __post_init__(self) -> None:
        if self.max_memory is not None:
            parse_bytes(self.max_memory)
        self.check_positive_ints(("seq_len", "diffusion_steps", "batch_size", "grad_accum", "steps",
                                  "log_every", "eval_every", "eval_size", "save_every", "keep_checkpoints",
                                  "eval_bleu_steps"))
        if isinstance(self.eval_bleu, bool) or not isinstance(self.eval_bleu, int) or self.eval_bleu < 0:
            raise ValueError(f"eval_bleu must be an int >= 0, got {self.eval_bleu!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if not isinstance(self.ema_warmup, bool):
            raise ValueError(f"ema_warmup must be true or false, got {self.ema_warmup!r}")
        if isinstance(self.soft_absorb, bool) or not isinstance(self.soft_absorb, (int, float)) \
                or not 0.0 <= self.soft_absorb <= 1.0:
            raise ValueError(f"soft_absorb must be a number in [0, 1], got {self.soft_absorb!r}")
        if self.preset not in ModelConfig.PRESETS:
            raise ValueError(f"preset must be one of {ModelConfig.PRESETS}, got {self.preset!r}")
        make_timestep_sampler(self.timestep_sampler, 1)
        if self.precision not in DiffusionTransformer.PRECISIONS:
            raise ValueError(f"precision must be one of {DiffusionTransformer.PRECISIONS}, got {self.precision!r}")

    @classmethod
    def for_preset(cls, preset: str, **fields: Any) -> "TeacherConfig":
        """A config of ``preset`` with its recipe (PRESET_RECIPES) under ``fields``."""
        return cls.from_dict(with_recipe({**fields, "preset": preset}))

    def model_config(self, vocab_size: int) -> ModelConfig:
        kw = dict(self.model)
        kw.update(vocab_size=vocab_size, seq_len=self.seq_len, diffusion_steps=self.diffusion_steps)
        if self.soft_absorb > 0:
            kw["mask_embedding"] = True
        return ModelConfig.preset(self.preset, **kw)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    return base * max(0.0, (total - step) / max(1, total - warmup))


class Teacher(SequenceModel):
    """A trained diffusion LM that samples with the ancestral or DDIM reverse process."""

    kind = "teacher"

    def generate(self, sources: Sequence[str], steps: Optional[int] = None, method: str = "ancestral",
                 clamp: bool = True, num_candidates: int = 1, seed: int = 0, batch_size: int = 64,
                 return_ids: bool = False, return_candidates: bool = False,
                 progress: Optional[Callable[[int], None]] = None,
                 comm: Optional[LocalComm] = None, precision: Optional[str] = None,
                 decode: str = "logits") -> Any:
        """Generate a target for every source string.

        ``steps``: T for ancestral (the default), k for ``method="ddim"``. With
        ``num_candidates`` S > 1 every source gets S samples (different seeds) and the
        MBR choice is returned. Returns strings; with ``return_ids`` also the token ids
        [N, L]; with ``return_candidates`` also the S candidate strings per source.
        ``comm`` (:mod:`dlmone.distributed`) shares the batches out over MPI ranks.
        ``precision="bf16"`` runs the network's products in bf16 on Intel AMX for this call
        (RuntimeError on a CPU or build without AMX-BF16). ``decode``: ``"logits"`` (argmax
        of the tied logits, SPEC §5) or ``"nearest"`` (the nearest word embedding).
        """
        def sample(x_src: np.ndarray, mask: np.ndarray, batch_seed: int) -> np.ndarray:
            return teacher_sample(self.model, self.diffusion, x_src, mask, steps, method, clamp,
                                  batch_seed, progress)

        return self._generate(sources, sample, num_candidates, seed, batch_size, return_ids,
                              return_candidates, comm, precision, decode)


# ------------------------------------------------------------------ training
def build_tokenizer(config: TeacherConfig, data: Seq2SeqData) -> Tokenizer:
    if config.vocab_file:
        return Tokenizer.from_vocab_file(config.vocab_file)
    texts = [s for pair in data.train for s in pair]
    if not texts:
        raise ValueError("the training split is empty: nothing to train a tokenizer on")
    return Tokenizer.train(texts, config.vocab_size)


def validation_loss(model: DiffusionTransformer, diffusion: Diffusion, ids: np.ndarray,
                    mask: np.ndarray, batch_size: int, seed: int,
                    comm: Optional[LocalComm] = None) -> Dict[str, float]:
    """Mean loss terms on fixed (seeded) timesteps and noise; no gradients. With a
    communicator the batches are dealt round robin to the ranks and the sums added up."""
    comm = LocalComm() if comm is None else comm
    rng = np.random.default_rng(seed)
    t_all = rng.integers(0, diffusion.T, size=len(ids))
    names = ("loss", "mse", "nll")
    sums = np.zeros(len(names))
    for bi, sl in enumerate(batched(len(ids), batch_size)):
        if not comm.owns(bi):
            continue
        terms = training_loss(model, diffusion, ids[sl], mask[sl], t_all[sl], None,
                              seed=derive_seed(seed, bi), train=False, backward=False)
        n = sl.stop - sl.start
        sums += [getattr(terms, k) * n for k in names]
    comm.sum_inplace(sums)
    return {k: float(v) / max(1, len(ids)) for k, v in zip(names, sums)}


def teacher_from_checkpoint(path: PathLike) -> Teacher:
    """The teacher (EMA weights) of a training checkpoint: a ``checkpoints/step-N`` folder,
    or a run folder (its latest checkpoint). For evaluating a run before it ends; the
    teacher's info records the step."""
    path = Path(path)
    folder = path if (path / "run.json").exists() else ckpt.latest_checkpoint(path)
    if folder is None:
        raise ValueError(f"{path} is neither a checkpoint folder (with run.json) nor a run folder with checkpoints")
    run = ckpt.read_run_json(folder, {"config": dict, "step": int})
    config = TeacherConfig.from_dict(run["config"])
    tokenizer = Tokenizer.load(folder)
    model = DiffusionTransformer(config.model_config(tokenizer.vocab_size))
    state = ckpt.load_tensors(folder / "state.safetensors")
    ckpt.check_tensors({k: v for k, v in state.items() if k == "ema"}, {"ema": (model.params.size,)}, str(folder))
    np.copyto(model.params, state["ema"])
    return Teacher(model, tokenizer, {"teacher_config": config.to_dict(), "checkpoint_step": run["step"]})


def train_teacher(config: TeacherConfig, data: Union[Seq2SeqData, PathLike], out_dir: PathLike,
                  resume: bool = True, progress: bool = True,
                  print_fn: Callable[[str], None] = print, comm: Optional[LocalComm] = None) -> Teacher:
    """Train a teacher; returns it (the EMA weights) and writes ``out_dir/teacher``.

    With ``resume`` (default) a run folder that already has checkpoints continues from
    the latest one and reaches the same weights as an uninterrupted run.

    ``comm`` (default :func:`dlmone.distributed.world`: MPI ranks under mpirun) trains
    data-parallel: every rank computes an equal share of each global batch of
    ``batch_size`` examples and the gradients are summed over the ranks, which reaches
    the single-process weights up to floating-point summation order. Rank 0 alone
    writes ``out_dir`` (and prints); every rank resumes from it, so it must lie on a
    file system that every rank sees.
    """
    from tqdm.auto import tqdm

    comm = world() if comm is None else comm
    rows = comm.rows(config.batch_size)  # this rank's share of every batch
    if not comm.is_root:
        progress, print_fn = False, discard
    out_dir = Path(out_dir)
    if not isinstance(data, Seq2SeqData):
        data = Seq2SeqData.from_dir(data, splits=("train", "valid"), limit=config.train_limit)
    if config.train_limit is not None:
        data = Seq2SeqData(train=data.train[:config.train_limit], valid=data.valid, test=data.test)
    if not data.train:
        raise ValueError("no training pairs")
    comm.check_same({**config.to_dict(), "training pairs": len(data.train)})
    start = comm.bcast(ckpt.latest_checkpoint(out_dir) if resume and comm.is_root else None)
    if start is not None:
        run = ckpt.read_run_json(start, {"config": dict, "step": int, "opt_step": int, "rng": dict})
        saved = TeacherConfig.from_dict(run["config"])
        if saved.run_fields() != config.run_fields():
            raise ValueError(f"{out_dir} holds a run with a different config; use another out_dir "
                             f"or resume=False")
        tokenizer = Tokenizer.load(start)
    else:  # rank 0 learns the vocabulary, every rank builds the same tokenizer from it
        tokenizer = Tokenizer(comm.bcast(build_tokenizer(config, data).vocab if comm.is_root else None))
    mcfg = config.model_config(tokenizer.vocab_size)
    check_memory(estimate_memory(mcfg, config.batch_size, "teacher"), config.max_memory, "train_teacher")
    diffusion = Diffusion(mcfg.diffusion_steps)
    ids, mask = encode_pairs(data.train, tokenizer, mcfg.seq_len)
    valid_pairs = data.valid[:config.eval_size] if data.valid else data.train[:config.eval_size]
    vids, vmask = encode_pairs(valid_pairs, tokenizer, mcfg.seq_len)

    model = DiffusionTransformer(mcfg, seed=config.seed)
    model.precision = config.precision  # RuntimeError before any work where AMX-BF16 is missing
    opt = AdamW(model, lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(model, config.ema_decay, warmup=config.ema_warmup)
    sampler = make_timestep_sampler(config.timestep_sampler, diffusion.T)
    rng = np.random.default_rng(config.seed)
    guard = NonFiniteGuard(config.max_bad_steps)
    step = 0
    if start is not None:
        state = ckpt.load_tensors(start / "state.safetensors")
        expected = (model.params.size,)
        ckpt.check_tensors({k: v for k, v in state.items() if not k.startswith("sampler.")},
                           {k: expected for k in ("params", "ema", "adam_m", "adam_v")}, str(start))
        np.copyto(model.params, state["params"])
        np.copyto(ema.params, state["ema"])
        opt.load_state_dict({"m": state["adam_m"], "v": state["adam_v"], "step": run["opt_step"]})
        sampler.load_state_dict({k[len("sampler."):]: state[k] for k in state if k.startswith("sampler.")})
        ckpt.restore_rng(rng, run["rng"], str(start / "run.json"))
        if "guard" in run:  # absent from checkpoints of older versions
            guard.load_state_dict(run["guard"])
        step = int(run["step"])
        print_fn(f"resuming from {start} at step {step}")
    log = JsonlLog(out_dir / "log.jsonl", keep_through=step if start is not None else -1) \
        if comm.is_root else NullLog()
    # process CPU seconds of the training steps (all threads, no validation); a timing, so
    # not in the checkpoint, whose bytes a resumed run reproduces: a resumed run carries on
    # from the last logged value, short by the steps since that record
    train_cpu_s = float(log.last("train_cpu_s", 0.0))
    eval_model = DiffusionTransformer(mcfg)
    info = {"teacher_config": config.to_dict()}

    def save_checkpoint() -> None:
        def fill(tmp: Path) -> None:
            tensors = {"params": model.params, "ema": ema.params, "adam_m": opt.m, "adam_v": opt.v}
            tensors.update({f"sampler.{k}": v.astype(np.float32) if v.dtype == np.float64 else v
                            for k, v in sampler.state_dict().items()})
            ckpt.save_tensors(tmp / "state.safetensors", tensors)
            (tmp / "run.json").write_text(json.dumps({
                "config": config.to_dict(), "step": step, "opt_step": opt.step_count,
                "rng": rng.bit_generator.state, "guard": guard.state_dict()}, indent=2))
            tokenizer.save(tmp)

        comm.check_identical(model.params, "teacher weights")
        if comm.is_root:
            ckpt.save_run_checkpoint(out_dir, step, fill, config.keep_checkpoints)

    def evaluate() -> Dict[str, Any]:
        np.copyto(eval_model.params, ema.params)
        vl = validation_loss(eval_model, diffusion, vids, vmask, config.batch_size, config.seed + 1, comm)
        teacher = Teacher(eval_model, tokenizer, info)
        srcs = [p[0] for p in valid_pairs[:config.eval_samples]]
        outs = teacher.generate(srcs, steps=config.eval_sample_steps, method="ddim", seed=config.seed,
                                comm=comm)
        if config.eval_bleu:  # the curve of a budget study (benchmarks/budget_study.py)
            scored = valid_pairs[:config.eval_bleu]
            sources = [p[0] for p in scored]
            hyps = teacher.generate(sources, steps=config.eval_bleu_steps, method="ddim", seed=config.seed,
                                    comm=comm)
            refs = tokenizer_protocol(tokenizer, mcfg.seq_len)(sources, [p[1] for p in scored])
            vl = {**vl, "bleu": bleu(hyps, refs),
                  "empty": float(np.mean([not h.strip() for h in hyps]))}
        return {"val": vl, "samples": [{"source": s, "reference": p[1], "recover": o}
                                       for s, p, o in zip(srcs, valid_pairs, outs)]}

    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="teacher", unit="step",
               dynamic_ncols=True)
    emit = bar.write if progress else print_fn  # above the bar when there is one
    tokens_per_step = config.batch_size * config.grad_accum * mcfg.seq_len
    t_last, last_step, comm_last = time.perf_counter(), step, comm.seconds
    governor = ThreadGovernor() if config.adaptive_threads else None
    try:
        while step < config.steps:
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            opt.lr = lr_at(step, config.lr, config.warmup, config.steps)
            model.zero_grad()
            loss_sum = {"loss": 0.0, "mse": 0.0, "nll": 0.0}
            for micro in range(config.grad_accum):
                idx = rng.integers(0, len(ids), size=config.batch_size)
                t, w = sampler.sample(config.batch_size, rng)
                terms = training_loss(model, diffusion, ids[idx], mask[idx], t,
                                      w / np.float32(config.grad_accum),
                                      seed=derive_seed(config.seed, step, micro), rows=rows,
                                      soft_absorb=config.soft_absorb)
                per_example = comm.gather_rows(terms.per_example)  # the sampler sees the global batch
                if np.isfinite(per_example).all():
                    sampler.update(t, per_example)
                for k in loss_sum:
                    loss_sum[k] += getattr(terms, k) / config.grad_accum
            comm.sum_inplace(model.grad_buffer)  # the ranks' shares add up to the global batch's
            loss_sum = dict(zip(loss_sum, comm.sum_inplace(np.array(list(loss_sum.values()))).tolist()))
            if guard.ok(loss_sum["loss"], model.grad_buffer, f"teacher step {step + 1}"):
                opt.step()
                ema.update(opt.step_count - 1)
            step += 1
            train_cpu_s += time.process_time() - cpu_before
            if governor:
                governor.step(time.perf_counter() - wall_before)
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                now = time.perf_counter()
                tps = tokens_per_step * (step - last_step) / max(now - t_last, 1e-9)
                comm_s = (comm.seconds - comm_last) / (step - last_step)
                t_last, last_step, comm_last = now, step, comm.seconds
                bar.set_postfix(loss=f"{loss_sum['loss']:.4f}", tok_s=f"{tps:,.0f}")
                log.write(step=step, lr=opt.lr, tokens_per_s=tps, skipped_steps=guard.skipped,
                          train_cpu_s=train_cpu_s, threads=get_num_threads(),
                          **({"comm_s_per_step": comm_s} if comm.size > 1 else {}), **loss_sum)
            if step % config.eval_every == 0 or step == config.steps:
                ev = evaluate()
                log.write(step=step, train_cpu_s=train_cpu_s, **{f"val_{k}": v for k, v in ev["val"].items()},
                          samples=ev["samples"])
                emit(f"step {step}: val loss {ev['val']['loss']:.4f} (mse {ev['val']['mse']:.4f}, "
                          f"nll {ev['val']['nll']:.4f})")
                for s in ev["samples"][:2]:
                    emit(f"  {s['source']!r} -> {s['recover']!r}")
            if step % config.save_every == 0 or step == config.steps:
                save_checkpoint()
    finally:
        if governor:
            governor.close()
        bar.close()
        log.close()
    final = DiffusionTransformer(mcfg)
    np.copyto(final.params, ema.params)
    teacher = Teacher(final, tokenizer, info)
    if comm.is_root:
        teacher.save(out_dir / "teacher")
    return teacher
