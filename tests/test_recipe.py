"""The teacher recipe options of SPEC §5.1: EMA warm-up (against its formula),
self-conditioning (the C network and its exact gradients against the PyTorch
reference, both input layouts, bf16; the two-pass training loss; the samplers feeding
the previous x̂0), DiffuSeq-v2's soft absorbing state (the learned [MASK] vector and its
gradient, the discrete-noise rate), the config values and --set, exact resume and
checkpoints with the options on, and distillation of a teacher that has them.
Options off are DiffuSeq's network bit for bit: the parity and import tests of
test_model / test_teacher cover that."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import dlmone
from dlmone.builtin_task import make_builtin_task
from dlmone.config_io import apply_overrides
from dlmone.data import Seq2SeqData
from dlmone.diffusion import (Diffusion, derive_seed, gaussian, self_cond_rows, soft_absorb_positions,
                              training_loss)
from dlmone.model import DiffusionTransformer
from dlmone.optim import EMA, ema_decay_at
from dlmone.sample import teacher_sample
from dlmone.teacher import Teacher, TeacherConfig, train_teacher

from conftest import TINY_SAME, assert_close, make_config, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(progress=False, print_fn=lambda s: None)
MODEL = {"emb_dim": 8, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32, "time_dim": 8}
RUN = dict(preset="tiny", model=MODEL, seq_len=24, vocab_size=120, steps=6, batch_size=8,
           eval_every=3, save_every=3, eval_size=8, eval_samples=2, eval_sample_steps=2,
           log_every=2, diffusion_steps=50)
OPTIONS = dict(model=dict(MODEL, self_conditioning=True, dropout=0.1), soft_absorb=0.5)


def _torch():
    return pytest.importorskip("torch")


def _ref(cfg, model):
    torch = _torch()
    from reference import TorchDiffuSeq, load_numpy_state

    ref = TorchDiffuSeq(cfg).to(torch.float64)
    load_numpy_state(ref, model.state_dict())
    ref.eval()
    return ref


@pytest.fixture(scope="module")
def data():
    return Seq2SeqData.from_pairs(**make_builtin_task(n_train=200, n_valid=20, n_test=20))


# ------------------------------------------------------------------ EMA warm-up
def test_ema_decay_at_is_the_formula():
    for s in (0, 1, 5, 100, 8990, 8991, 10**6):
        assert ema_decay_at(0.999, s, True) == min(0.999, (1 + s) / (10 + s))
        assert ema_decay_at(0.999, s, False) == 0.999
    assert ema_decay_at(0.999, 0, True) == pytest.approx(0.1)
    assert ema_decay_at(0.5, 20, True) == 0.5  # the cap (21/30 > 0.5)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_update_matches_the_recursion(tiny_cfg, rng, warmup):
    model = DiffusionTransformer(tiny_cfg, seed=1)
    ema = EMA(model, 0.95, warmup=warmup)
    want = model.params.astype(np.float64)
    for s in range(25):
        model.params[...] = rng.standard_normal(model.params.shape).astype(np.float32)
        ema.update(s)
        d = min(0.95, (1 + s) / (10 + s)) if warmup else 0.95
        want = d * want + (1 - d) * model.params
    assert_close(ema.params, want, "EMA", rtol=1e-5, atol=1e-6)


def test_train_teacher_updates_the_ema_with_the_optimiser_step(data, tmp_path, monkeypatch):
    """The EMA after step s (0 for the first) has decay min(d, (1+s)/(10+s)): the teacher is
    the recursion over the weights after each optimiser step."""
    snapshots = []
    real = EMA.update

    def spy(self, step=0):
        snapshots.append((step, self.model.params.copy()))
        real(self, step)

    monkeypatch.setattr(EMA, "update", spy)
    cfg = TeacherConfig(**dict(RUN, steps=4, eval_every=4, save_every=4, ema_decay=0.9, lr=1e-2))
    t = train_teacher(cfg, data, tmp_path / "run", **QUIET)
    assert [s for s, _ in snapshots] == [0, 1, 2, 3]
    want = DiffusionTransformer(t.config, seed=cfg.seed).params.astype(np.float64)
    for s, p in snapshots:
        d = min(0.9, (1 + s) / (10 + s))
        want = d * want + (1 - d) * p
    assert_close(t.model.params, want, "teacher = EMA with warm-up", rtol=1e-5, atol=1e-6)
    # a constant 0.9 would keep 0.9^4 = 66% of the initialisation; the warm-up keeps ~0.2%
    weight_of_init = np.prod([min(0.9, (1 + s) / (10 + s)) for s in range(4)])
    assert weight_of_init < 0.003
    const = DiffusionTransformer(t.config, seed=cfg.seed).params.astype(np.float64)
    for _, p in snapshots:
        const = 0.9 * const + 0.1 * p
    assert np.abs(t.model.params - const).max() > 100 * np.abs(t.model.params - want).max()


# ------------------------------------------------------------------ config and --set
def test_recipe_options_are_config_values_reachable_with_set():
    base = TeacherConfig().to_dict()
    assert base["ema_warmup"] is True and base["soft_absorb"] == 0.0
    assert base["timestep_sampler"] == "lossaware"
    over = apply_overrides(base, ["ema_warmup=false", "soft_absorb=0.5", "timestep_sampler=uniform",
                                  "model.dropout=0", "model.self_conditioning=true"])
    cfg = TeacherConfig.from_dict(over)
    assert cfg.ema_warmup is False and cfg.soft_absorb == 0.5 and cfg.timestep_sampler == "uniform"
    mcfg = cfg.model_config(100)
    assert mcfg.dropout == 0 and mcfg.self_conditioning and mcfg.mask_embedding
    plain = TeacherConfig().model_config(100)
    assert not plain.self_conditioning and not plain.mask_embedding


@pytest.mark.parametrize("kw", [dict(soft_absorb=-0.1), dict(soft_absorb=1.5), dict(soft_absorb=True),
                                dict(soft_absorb="half"), dict(ema_warmup=1), dict(ema_warmup="yes")])
def test_recipe_options_reject_bad_values(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        TeacherConfig(**kw)


def test_model_config_options_must_be_bools():
    with pytest.raises(TypeError, match="self_conditioning"):
        make_config(self_conditioning=1)
    with pytest.raises(TypeError, match="mask_embedding"):
        make_config(mask_embedding="yes")


# ------------------------------------------------------------------ the network
@pytest.mark.parametrize("same", [False, True], ids=["proj", "same"])
def test_parameter_table_with_options(same):
    base = TINY_SAME if same else {}
    plain = DiffusionTransformer(make_config(**base), seed=4)
    sc = DiffusionTransformer(make_config(**base, self_conditioning=True), seed=4)
    me = DiffusionTransformer(make_config(**base, mask_embedding=True), seed=4)
    E, H = plain.config.emb_dim, plain.config.hidden_dim
    proj = "self_cond_proj" if same else "input_up_proj.0"
    assert sc.layout[proj + ".weight"][1] == (H, 2 * E)
    assert (proj + ".weight" in plain.layout) == (not same)
    assert set(sc.layout) - set(plain.layout) == ({"self_cond_proj.weight", "self_cond_proj.bias"} if same else set())
    # the [MASK] vector is one more tensor, last: every other tensor keeps its place and values
    assert set(me.layout) - set(plain.layout) == {"mask_embedding"}
    assert me.layout["mask_embedding"] == (plain.params.size, (E,))
    assert np.array_equal(me.params[:plain.params.size], plain.params)
    for name, (off, shape) in plain.layout.items():
        assert me.layout[name] == (off, shape)
    # the table without a model, and the parameter count, agree
    from dlmone.resources import _dims, _num_parameters
    for m in (sc, me):
        assert dlmone._core.param_layout(**_dims(m.config)) == m._core.layout()
        assert _num_parameters(m.config) == m.params.size
    from reference import expected_state_keys
    for m in (plain, sc, me):
        assert set(expected_state_keys(m.config)) == set(m.state_dict())


@pytest.mark.parametrize("same", [False, True], ids=["proj", "same"])
@pytest.mark.parametrize("with_sc", [True, False], ids=["x_self_cond", "zeros"])
def test_self_conditioning_forward_backward_match_torch(rng, same, with_sc):
    torch = _torch()
    cfg = make_config(**(TINY_SAME if same else {}), self_conditioning=True, mask_embedding=True)
    m = make_model(cfg, rng)
    ref = _ref(cfg, m)
    B, L, E = 3, 7, cfg.emb_dim
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    xs = rng.standard_normal((B, L, E)).astype(np.float32) if with_sc else None
    t = rng.integers(0, cfg.diffusion_steps, B)
    gy = rng.standard_normal((B, L, E)).astype(np.float32)
    gh = rng.standard_normal((B, L, cfg.hidden_dim)).astype(np.float32)
    m.zero_grad()
    y = m.forward(x, t, x_self_cond=xs)
    hidden = m.hidden
    gx = m.backward(gy, grad_hidden=gh)

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    xst = None if xs is None else torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    yr = ref(xt, torch.tensor(t * 1000.0 / cfg.diffusion_steps), xst)
    ((yr * torch.tensor(gy, dtype=torch.float64)).sum()
     + (ref.last_hidden * torch.tensor(gh, dtype=torch.float64)).sum()).backward()
    assert_close(y, yr.detach().numpy(), "y")
    assert_close(hidden, ref.last_hidden.detach().numpy(), "hidden")
    assert_close(gx, xt.grad.numpy(), "grad x_t")
    grads = m.grads()
    for k, p in ref.named_parameters(remove_duplicate=False):
        assert_close(grads[k], np.zeros(p.shape) if p.grad is None else p.grad.numpy(), f"grad {k}")
    assert not grads["mask_embedding"].any()  # the forward does not read it
    if xs is not None:  # the self-conditioning input matters (a stop-gradient, but an input)
        assert np.abs(xst.grad.numpy()).max() > 1e-3
        assert not np.allclose(y, m.forward(x, t), atol=1e-4)
    else:  # None is zeros
        assert np.array_equal(y, m.forward(x, t, x_self_cond=np.zeros_like(x)))


def test_self_conditioning_train_mode_is_deterministic_and_row_offset_shards(rng):
    cfg = make_config(self_conditioning=True, dropout=0.3)
    m = make_model(cfg, rng)
    B, L, E = 4, 6, cfg.emb_dim
    x, xs = (rng.standard_normal((B, L, E)).astype(np.float32) for _ in range(2))
    t = rng.integers(0, cfg.diffusion_steps, B)
    y = m.forward(x, t, train=True, seed=9, x_self_cond=xs)
    assert np.array_equal(y, m.forward(x, t, train=True, seed=9, x_self_cond=xs))
    part = m.forward(x[2:], t[2:], train=True, seed=9, row_offset=2, x_self_cond=xs[2:])
    assert_close(part, y[2:], "shard", rtol=1e-5, atol=1e-6)


def test_self_conditioning_bad_input(rng, tiny_cfg):
    plain = make_model(tiny_cfg, rng)
    x = np.zeros((2, 5, tiny_cfg.emb_dim), np.float32)
    with pytest.raises(ValueError, match="self-conditioning"):
        plain.forward(x, np.array([1, 2]), x_self_cond=x)
    m = make_model(make_config(self_conditioning=True), rng)
    with pytest.raises(ValueError, match="x_self_cond"):
        m.forward(x, np.array([1, 2]), x_self_cond=x[:, :4])
    with pytest.raises(TypeError, match="x_self_cond"):
        m.forward(x, np.array([1, 2]), x_self_cond=x.astype(np.int32))
    m.forward(x, np.array([1, 2]), x_self_cond=x.astype(np.float64))  # converted, like x


@pytest.mark.parametrize("same", [False, True], ids=["proj", "same"])
def test_self_conditioning_bf16_inference(rng, same):
    if not dlmone._core.build_info()["amx_bf16"]:
        pytest.skip("no AMX-BF16 on this CPU or build")
    cfg = make_config(**(TINY_SAME if same else {}), self_conditioning=True)
    m = make_model(cfg, rng)
    x, xs = (rng.standard_normal((2, 9, cfg.emb_dim)).astype(np.float32) for _ in range(2))
    t = np.array([3, 700])
    y32 = m.forward(x, t, x_self_cond=xs)
    m.inference_precision = "bf16"
    y16 = m.forward(x, t, x_self_cond=xs)
    err = np.abs(y16 - y32).max() / np.abs(y32).max()
    assert 0 < err < 0.05, err


# ------------------------------------------------------------------ the training loss
def _torch_loss(ref, d, tokens, mask, t, w, seed, E, absorbed, use_sc):
    """SPEC §5's loss in torch (float64), with the recipe options: the [MASK] vector on the
    absorbed positions of x_t, and a detached first pass as the self-conditioning input of
    the rows in use_sc."""
    torch = _torch()
    B, L = tokens.shape
    dt = torch.float64
    eps0 = torch.tensor(gaussian((B, L, E), derive_seed(seed, 0)), dtype=dt)
    eps = torch.tensor(gaussian((B, L, E), derive_seed(seed, 1)), dtype=dt)
    tok = torch.tensor(tokens)
    abar = torch.tensor(d.alphas_cumprod, dtype=dt)
    m = torch.tensor(mask, dtype=dt)[:, :, None]
    x0_mean = ref.word_embedding(tok)
    x0 = x0_mean + torch.sqrt(1 - abar[0]) * eps0
    a = abar[torch.tensor(t)][:, None, None]
    x_t = m * (torch.sqrt(a) * x0 + torch.sqrt(1 - a) * eps) + (1 - m) * x0
    if absorbed is not None:
        x_t = torch.where(torch.tensor(absorbed)[:, :, None], ref.mask_embedding[None, None], x_t)
    t_scaled = torch.tensor(np.asarray(t, np.float64) * (1000.0 / d.T), dtype=dt)
    x_sc = None
    if use_sc is not None:
        with torch.no_grad():
            x_sc = ref(x_t, t_scaled) * torch.tensor(use_sc, dtype=dt)[:, None, None]
    pred = ref(x_t, t_scaled, x_sc)
    target = torch.where(torch.tensor(t == 0)[:, None, None], x0_mean, x0)
    mse = ((pred - target) ** 2).mean(dim=(1, 2))
    logits = x0 @ ref.word_embedding.weight.T + ref.lm_head.bias
    nll = torch.nn.functional.cross_entropy(logits.reshape(B * L, -1), tok.reshape(-1),
                                            reduction="none").reshape(B, L).mean(dim=1)
    prior = ((torch.sqrt(abar[-1]) * x0) ** 2).mean(dim=(1, 2))
    per = mse + nll + prior
    return (torch.tensor(w, dtype=dt) * per).mean(), per


@pytest.mark.parametrize("same", [False, True], ids=["proj", "same"])
@pytest.mark.parametrize("options", ["self_cond", "soft_absorb", "both"])
def test_training_loss_with_options_matches_torch(rng, same, options):
    sc, sa = options in ("self_cond", "both"), options in ("soft_absorb", "both")
    T = 20
    cfg = make_config(**dict(TINY_SAME if same else {}, diffusion_steps=T), self_conditioning=sc,
                      mask_embedding=sa)
    model = make_model(cfg, rng)
    d = Diffusion(T)
    B, L = 6, cfg.seq_len
    tokens = rng.integers(0, cfg.vocab_size, (B, L))
    mask = np.zeros((B, L), np.float32)
    for b in range(B):
        mask[b, 2 + b:] = 1.0
    t = rng.integers(1, T, B)
    t[0], t[3] = 0, T - 1
    w = rng.uniform(0.5, 2.0, B).astype(np.float32)
    seed, rate = 11, (0.9 if sa else 0.0)
    absorbed = soft_absorb_positions(d, t, mask, rate, derive_seed(seed, 3)) if sa else None
    use_sc = self_cond_rows(B, derive_seed(seed, 4)) if sc else None
    if sa:
        assert absorbed.any() and not absorbed[mask == 0].any()
    if sc:
        assert use_sc.any() and not use_sc.all()

    model.zero_grad()
    terms = training_loss(model, d, tokens, mask, t, w, seed=seed, soft_absorb=rate)
    ref = _ref(cfg, model)
    loss, per = _torch_loss(ref, d, tokens, mask, t, w, seed, cfg.emb_dim, absorbed, use_sc)
    loss.backward()
    assert_close(terms.per_example, per.detach().numpy(), "per_example", rtol=1e-5, atol=1e-6)
    assert terms.loss == pytest.approx(loss.item(), rel=1e-5)
    grads = model.grads()
    for k, p in ref.named_parameters():
        want = np.zeros(p.shape) if p.grad is None else p.grad.numpy()
        scale = max(np.abs(want).max(), 1e-3)
        assert_close(grads[k], want, f"grad {k}", rtol=1e-4, atol=1e-5 * scale)
    if sa:
        assert np.abs(grads["mask_embedding"]).max() > 1e-4


def test_soft_absorb_rate_follows_the_schedule(rng):
    d = Diffusion(100)
    B, L = 400, 50
    mask = np.ones((B, L), np.float32)
    mask[:, :10] = 0
    for t0 in (0, 50, 99):
        t = np.full(B, t0)
        got = soft_absorb_positions(d, t, mask, 0.5, seed=3)
        assert not got[:, :10].any()
        p = 0.5 * d.sqrt_one_minus_alphas_cumprod[t0]
        n = B * (L - 10)
        assert abs(got[:, 10:].mean() - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-12
    # a shard gets the whole batch's draws
    t = rng.integers(0, 100, B)
    whole = soft_absorb_positions(d, t, mask, 0.5, seed=8)
    assert np.array_equal(soft_absorb_positions(d, t[100:300], mask[100:300], 0.5, 8, row0=100, total=B),
                          whole[100:300])
    assert abs(self_cond_rows(4000, 1).mean() - 0.5) < 0.04


def test_soft_absorb_needs_the_mask_embedding(rng, tiny_cfg):
    model = make_model(tiny_cfg, rng)
    d = Diffusion(tiny_cfg.diffusion_steps)
    tokens = rng.integers(0, tiny_cfg.vocab_size, (2, tiny_cfg.seq_len))
    mask = np.ones(tokens.shape, np.float32)
    with pytest.raises(ValueError, match="mask_embedding"):
        training_loss(model, d, tokens, mask, np.array([1, 2]), soft_absorb=0.5)
    with pytest.raises(ValueError, match="soft_absorb"):
        training_loss(model, d, tokens, mask, np.array([1, 2]), soft_absorb=1.5)


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("method", ["ddim", "ancestral"])
def test_samplers_feed_the_previous_prediction(rng, method):
    cfg = make_config(self_conditioning=True, diffusion_steps=6)
    model = make_model(cfg, rng)
    d = Diffusion(cfg.diffusion_steps)
    calls = []
    real = model.forward

    def spy(x, t, **kw):
        y = real(x, t, **kw)
        calls.append((kw.get("x_self_cond"), y))
        return y

    model.forward = spy
    B, L = 2, 8
    x_src = rng.standard_normal((B, L, cfg.emb_dim)).astype(np.float32)
    mask = np.zeros((B, L), np.float32)
    mask[:, 3:] = 1
    steps = 4 if method == "ddim" else None
    out = teacher_sample(model, d, x_src, mask, steps, method, clamp=True, seed=2)
    assert len(calls) == (4 if method == "ddim" else 6)
    assert calls[0][0] is None
    for (sc, _), (_, prev) in zip(calls[1:], calls[:-1]):
        assert sc is prev  # the raw prediction of the previous step, before clamping
    model.forward = real
    assert np.array_equal(out, teacher_sample(model, d, x_src, mask, steps, method, clamp=True, seed=2))


# ------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def recipe_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    cfg = TeacherConfig(**dict(RUN, **OPTIONS, steps=8, save_every=4, eval_every=4, grad_accum=2))
    t = train_teacher(cfg, data, out, **QUIET)
    return out, t, cfg


def test_recipe_run_checkpoint_and_load(recipe_run, tmp_path):
    out, t, cfg = recipe_run
    meta = json.loads((out / "teacher" / "config.json").read_text())
    assert meta["model"]["self_conditioning"] is True and meta["model"]["mask_embedding"] is True
    assert meta["teacher_config"]["soft_absorb"] == 0.5
    loaded = Teacher.load(out / "teacher")
    assert loaded.config.self_conditioning and "mask_embedding" in loaded.model.layout
    assert np.array_equal(loaded.model.params, t.model.params)
    srcs = ["why is the sky blue ?", "how do cats sleep ?"]
    assert loaded.generate(srcs, steps=3, method="ddim") == t.generate(srcs, steps=3, method="ddim")
    # the [MASK] vector was trained
    init = DiffusionTransformer(t.config, seed=cfg.seed)
    assert not np.array_equal(t.model.state_dict()["mask_embedding"], init.state_dict()["mask_embedding"])


def test_recipe_run_resumes_bit_for_bit(recipe_run, data, tmp_path):
    straight, _, cfg = recipe_run
    out = tmp_path / "b"
    train_teacher(cfg, data, out, **QUIET)
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    shutil.rmtree(out / "teacher")
    (out / "checkpoints" / "latest").write_text("step-00000004\n")
    train_teacher(cfg, data, out, **QUIET)
    for rel in ("teacher/model.safetensors", "checkpoints/step-00000008/state.safetensors"):
        assert (out / rel).read_bytes() == (straight / rel).read_bytes(), rel


def test_distill_a_recipe_teacher(recipe_run, data, tmp_path):
    from dlmone.distill import FROZEN, DistillConfig, Distiller, Student, distill

    run, teacher, _ = recipe_run
    cfg = DistillConfig(t_init=40, t_max=45, batch_size=8, steps=2, eval_every=2, eval_size=6,
                        log_every=1, save_every=2, lr_g=1e-3, lr_psi=1e-3)
    with warnings.catch_warnings():  # two steps of a tiny model: the degeneration monitors may fire
        warnings.simplefilter("ignore", RuntimeWarning)
        student = distill(run / "teacher", data, cfg, tmp_path / "d", stage=1, **QUIET)
    assert student.config.self_conditioning
    # the [MASK] vector stays the teacher's, like the word embeddings
    for name in ("mask_embedding", "word_embedding.weight"):
        assert np.array_equal(student.model.state_dict()[name], teacher.model.state_dict()[name])
    out = Student.load(tmp_path / "d" / "student").generate(["why is the sky blue ?"], steps=2)
    assert len(out) == 1 and isinstance(out[0], str)
    # the steps move G and ψ, but not the frozen tensors
    from dlmone.data import encode_pairs
    dist = Distiller(teacher, cfg, stage=1)
    ids, mask = encode_pairs(data.train[:8], teacher.tokenizer, teacher.config.seq_len)
    g0, psi0 = dist.G.params.copy(), dist.psi.params.copy()
    for s in range(2):
        assert all(np.isfinite(v) for v in dist.psi_step(ids, mask, seed=s).values())
        assert all(np.isfinite(v) for v in dist.g_step(ids, mask, seed=100 + s).values())
    for net, before in ((dist.G, g0), (dist.psi, psi0)):
        sd = dict(zip(net.layout, (before[o:o + int(np.prod(sh))] for o, sh in net.layout.values())))
        for name in net.layout:
            moved = not np.array_equal(net.state_dict()[name].ravel(), sd[name])
            assert moved == (name not in FROZEN + ("mask_embedding",)) or name.endswith("key.bias"), name
