"""dlmone.teacher (SPEC §5): TeacherConfig, the learning-rate schedule, a short
training run that must learn, the run folder (log, checkpoints, teacher), exact
resume after an interruption, Teacher.generate (DDIM / ancestral, candidates and
MBR, ids, determinism, errors), save -> dlmone.load round trips, and the DiffuSeq
importer (dlmone.from_diffuseq) against the PyTorch reference.

Everything runs on tiny configs (a few thousand parameters, T <= 50) with one
OpenMP thread.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import dlmone
from dlmone import checkpoint as ckpt
from dlmone import teacher as teacher_mod
from dlmone.builtin_task import make_builtin_task, write_builtin_task
from dlmone.data import Seq2SeqData, decode_targets, encode_pairs
from dlmone.diffusion import Diffusion
from dlmone.metrics import mbr_select
from dlmone.model import DiffusionTransformer
from dlmone.teacher import Teacher, TeacherConfig, lr_at, train_teacher, validation_loss

from conftest import make_model

MODEL = {"emb_dim": 8, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32, "time_dim": 8}
TINY_RUN = dict(preset="tiny", model=MODEL, seq_len=24, vocab_size=120, steps=6, batch_size=8,
                eval_every=3, save_every=3, eval_size=8, eval_samples=2, eval_sample_steps=2,
                log_every=2, diffusion_steps=50)
QUIET = dict(progress=False, print_fn=lambda s: None)


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    d = dict(TINY_RUN)
    d.update(kw)
    return TeacherConfig(**d)


@pytest.fixture(scope="module")
def data():
    return Seq2SeqData.from_pairs(**make_builtin_task(n_train=200, n_valid=20, n_test=20))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One 6-step run: (out_dir, teacher, config)."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = _cfg()
    t = train_teacher(cfg, data, out, **QUIET)
    return out, t, cfg


@pytest.fixture(scope="module")
def rand_teacher(trained):
    """A teacher with random (diverse) weights and the trained run's tokenizer, so that
    different seeds give different samples."""
    _, t, _ = trained
    model = make_model(t.config, np.random.default_rng(7), seed=3)
    return Teacher(model, t.tokenizer, {"note": "random"})


def _read_log(path):
    return [json.loads(line) for line in open(path) if line.strip()]


# ------------------------------------------------------------------ TeacherConfig
def test_config_roundtrip_and_model_config():
    cfg = _cfg(lr=2e-3, model=dict(MODEL, dropout=0.1))
    d = cfg.to_dict()
    assert TeacherConfig.from_dict(json.loads(json.dumps(d))) == cfg
    m = cfg.model_config(117)
    assert (m.vocab_size, m.seq_len, m.diffusion_steps) == (117, 24, 50)
    assert (m.emb_dim, m.hidden_dim, m.num_layers, m.num_heads, m.ffn_dim, m.time_dim) == (8, 16, 1, 2, 32, 8)
    assert m.dropout == 0.1
    # the preset supplies what `model` does not override
    base = TeacherConfig(preset="small").model_config(50)
    assert (base.emb_dim, base.hidden_dim, base.num_layers) == (64, 128, 3)


@pytest.mark.parametrize("kw", [
    dict(steps=0), dict(batch_size=-1), dict(batch_size=True), dict(seq_len=2.0), dict(grad_accum=0),
    dict(lr=0.0), dict(lr=-1e-3), dict(warmup=-1), dict(ema_decay=1.5), dict(ema_decay=-0.1),
    dict(preset="huge"), dict(timestep_sampler="foo"), dict(eval_every=0), dict(keep_checkpoints=0),
])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        _cfg(**kw)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown TeacherConfig keys.*lerning_rate"):
        TeacherConfig.from_dict({"lerning_rate": 1.0})


# ------------------------------------------------------------------ lr schedule
def test_lr_at_warmup_then_linear_decay():
    vals = [lr_at(s, 1.0, 4, 10) for s in range(11)]
    np.testing.assert_allclose(vals[:4], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(vals[4:], [6 / 6, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    assert lr_at(12, 1.0, 4, 10) == 0.0  # never negative past the end
    # no warm-up: linear decay from the base
    np.testing.assert_allclose([lr_at(s, 2e-3, 0, 4) for s in range(5)], [2e-3, 1.5e-3, 1e-3, 5e-4, 0.0])
    # warm-up is monotone and every value lies in (0, base]
    ws = [lr_at(s, 3.0, 100, 1000) for s in range(1000)]
    assert all(0 < v <= 3.0 for v in ws)
    assert ws[:100] == sorted(ws[:100]) and ws[100:] == sorted(ws[100:], reverse=True)


# ------------------------------------------------------------------ training
def test_short_run_lowers_validation_loss(data, tmp_path):
    """60 steps at lr 3e-3 with ema_decay=0 (teacher == trained weights) must clearly
    lower the validation loss below that of the same model at initialisation."""
    cfg = _cfg(steps=60, lr=3e-3, warmup=5, ema_decay=0.0, batch_size=16, eval_every=60, save_every=60,
               eval_size=16, eval_samples=1, log_every=10)
    t = train_teacher(cfg, data, tmp_path / "run", **QUIET)
    ids, mask = encode_pairs(data.valid, t.tokenizer, cfg.seq_len)
    diffusion = Diffusion(cfg.diffusion_steps)
    init = DiffusionTransformer(t.config, seed=cfg.seed)
    before = validation_loss(init, diffusion, ids, mask, 16, seed=5)
    after = validation_loss(t.model, diffusion, ids, mask, 16, seed=5)
    assert after["loss"] < 0.85 * before["loss"], (before, after)
    assert after["nll"] < before["nll"]
    # the logged training loss went down too
    train = [r for r in _read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert train[-1]["loss"] < 0.85 * train[0]["loss"]
    # ema_decay 0: the EMA equals the trained parameters
    state = ckpt.load_tensors(tmp_path / "run" / "checkpoints" / "step-00000060" / "state.safetensors")
    assert np.array_equal(state["params"], state["ema"])
    assert np.array_equal(t.model.params, state["params"])


def test_validation_loss_is_deterministic(trained, data):
    _, t, cfg = trained
    ids, mask = encode_pairs(data.valid, t.tokenizer, cfg.seq_len)
    d = Diffusion(cfg.diffusion_steps)
    a = validation_loss(t.model, d, ids, mask, 7, seed=3)
    b = validation_loss(t.model, d, ids, mask, 7, seed=3)
    assert a == b
    assert set(a) == {"loss", "mse", "nll"} and all(np.isfinite(v) for v in a.values())
    assert a["loss"] >= a["mse"] + a["nll"] - 1e-6  # loss adds the (non-negative) prior term


def test_ema_decay_one_keeps_initial_weights(data, tmp_path):
    cfg = _cfg(steps=3, ema_decay=1.0, ema_warmup=False, lr=1e-2, warmup=0)
    t = train_teacher(cfg, data, tmp_path / "run", **QUIET)
    init = DiffusionTransformer(t.config, seed=cfg.seed)
    assert np.array_equal(t.model.params, init.params)


def test_run_folder_contents(trained):
    out, t, cfg = trained
    log = _read_log(out / "log.jsonl")
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in val] == [3, 6]
    for r in train:  # the logged lr is the one the step used
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg.lr, cfg.warmup, cfg.steps))
        assert all(np.isfinite(r[k]) for k in ("loss", "mse", "nll", "tokens_per_s"))
    for r in val:
        assert len(r["samples"]) == cfg.eval_samples
        assert set(r["samples"][0]) == {"source", "reference", "recover"}
    # checkpoints: keep_checkpoints=2 of (3, 6), pointer to the latest
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-00000003", "step-00000006"]
    assert (ck / "latest").read_text().strip() == "step-00000006"
    run = json.loads((ck / "step-00000006" / "run.json").read_text())
    assert run["step"] == 6 and run["config"] == cfg.to_dict()
    state = ckpt.load_tensors(ck / "step-00000006" / "state.safetensors")
    assert {"params", "ema", "adam_m", "adam_v"} <= set(state)
    assert np.array_equal(state["ema"], t.model.params)
    # teacher folder
    meta = json.loads((out / "teacher" / "config.json").read_text())
    assert meta["kind"] == "teacher" and meta["teacher_config"] == cfg.to_dict()
    assert meta["model"] == t.config.to_dict()
    assert sorted(p.name for p in (out / "teacher").iterdir()) == ["SHA256SUMS", "config.json", "model.safetensors", "vocab.txt"]
    assert t.tokenizer.vocab_size <= cfg.vocab_size
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_keep_checkpoints_prunes_old_ones(data, tmp_path):
    cfg = _cfg(steps=6, save_every=2, eval_every=6, keep_checkpoints=2)
    train_teacher(cfg, data, tmp_path, **QUIET)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]
    cfg1 = _cfg(steps=6, save_every=2, eval_every=6, keep_checkpoints=1)
    train_teacher(cfg1, data, tmp_path / "one", **QUIET)
    assert [p.name for p in (tmp_path / "one" / "checkpoints").glob("step-*")] == ["step-00000006"]


def test_train_from_data_folder_equals_in_memory(data, tmp_path, trained):
    """A DiffuSeq jsonl folder of the same pairs gives bitwise the same teacher."""
    _, t, cfg = trained
    folder = write_builtin_task(tmp_path / "data", n_train=200, n_valid=20, n_test=20)
    t2 = train_teacher(cfg, folder, tmp_path / "run", **QUIET)
    assert t2.tokenizer == t.tokenizer
    assert np.array_equal(t2.model.params, t.model.params)


def test_vocab_file_and_train_limit(data, tmp_path, trained):
    out, t, _ = trained
    cfg = _cfg(steps=2, vocab_file=str(out / "teacher" / "vocab.txt"), vocab_size=5, train_limit=30)
    t2 = train_teacher(cfg, data, tmp_path, **QUIET)
    assert t2.tokenizer == t.tokenizer and t2.config.vocab_size == t.tokenizer.vocab_size


def test_no_training_pairs_raises(tmp_path):
    with pytest.raises(ValueError, match="no training pairs"):
        train_teacher(_cfg(), Seq2SeqData.from_pairs(valid=[("a", "b")]), tmp_path, **QUIET)


# ------------------------------------------------------------------ resume
# dropout, gradient accumulation, weight decay, EMA and a lossaware sampler whose
# history is full (T = 5) by the time of the checkpoint: all of it must resume exactly.
RESUME = dict(model=dict(MODEL, dropout=0.1), diffusion_steps=5, steps=12, batch_size=8, grad_accum=2,
              weight_decay=0.01, ema_decay=0.9, lr=3e-3, warmup=3, save_every=3, eval_every=6,
              log_every=2, eval_sample_steps=2, keep_checkpoints=2)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train_teacher(_cfg(**RESUME), data, out, **QUIET)
    return out


@pytest.mark.parametrize("how", ["interrupt", "rewind"])
def test_resume_equals_uninterrupted(data, tmp_path, straight, monkeypatch, how):
    cfg = _cfg(**RESUME)
    out = tmp_path / "b"
    if how == "interrupt":
        # Ctrl-C during the step-12 validation: after the step-9 checkpoint, before step 12's
        calls = []
        real = teacher_mod.validation_loss

        def flaky(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*a, **k)

        with monkeypatch.context() as m:
            m.setattr(teacher_mod, "validation_loss", flaky)
            with pytest.raises(KeyboardInterrupt):
                train_teacher(cfg, data, out, **QUIET)
        assert not (out / "teacher").exists()
    else:
        # a finished run, rewound to its step-9 checkpoint
        train_teacher(cfg, data, out, **QUIET)
        shutil.rmtree(out / "checkpoints" / "step-00000012")
        shutil.rmtree(out / "teacher")
        (out / "checkpoints" / "latest").write_text("step-00000009\n")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000009"
    state9 = ckpt.load_tensors(out / "checkpoints" / "step-00000009" / "state.safetensors")
    assert (state9["sampler.counts"] == 10).all(), "the lossaware history should be full at step 9"

    messages = []
    t = train_teacher(cfg, data, out, progress=False, print_fn=messages.append)
    assert any("resuming" in s and "step 9" in s for s in messages), messages
    for rel in ("teacher/model.safetensors", "teacher/vocab.txt", "checkpoints/step-00000012/state.safetensors"):
        assert (out / rel).read_bytes() == (straight / rel).read_bytes(), rel
    assert json.loads((out / "checkpoints/step-00000012/run.json").read_text()) == \
        json.loads((straight / "checkpoints/step-00000012/run.json").read_text())
    assert np.array_equal(t.model.params, Teacher.load(straight / "teacher").model.params)
    # records after the checkpoint were dropped and written again: the log is the
    # uninterrupted run's (timings aside)
    log_b, ref = _read_log(out / "log.jsonl"), _read_log(straight / "log.jsonl")
    for r in log_b + ref:
        r.pop("tokens_per_s", None)
        r.pop("threads", None)
        r.pop("train_cpu_s", None)
    assert [r["step"] for r in log_b] == [r["step"] for r in ref] and log_b == ref


def test_resume_finished_run_is_a_no_op(trained, data):
    out, t, cfg = trained
    n = len(_read_log(out / "log.jsonl"))
    before = (out / "teacher" / "model.safetensors").read_bytes()
    t2 = train_teacher(cfg, data, out, **QUIET)
    assert len(_read_log(out / "log.jsonl")) == n
    assert (out / "teacher" / "model.safetensors").read_bytes() == before
    assert np.array_equal(t2.model.params, t.model.params)


def test_resume_with_a_different_config_raises(trained, data):
    out, _, cfg = trained
    for change in (dict(lr=cfg.lr * 2), dict(steps=12), dict(model=dict(MODEL, ffn_dim=64))):
        with pytest.raises(ValueError, match="different config"):
            train_teacher(_cfg(**change), data, out, **QUIET)


def test_restart_ignores_checkpoints(data, tmp_path, trained):
    _, t, cfg = trained
    out = tmp_path / "run"
    train_teacher(_cfg(lr=5e-3), data, out, **QUIET)
    # resume=False: a different config is fine and the result equals a fresh run
    t2 = train_teacher(cfg, data, out, resume=False, **QUIET)
    assert np.array_equal(t2.model.params, t.model.params)


# ------------------------------------------------------------------ generate
SOURCES = ["is medicine worse than painting for writers?", "why do programmers struggle?",
           "what is the best city for artists?", "how do i learn russian", "hello there"]


def test_generate_shapes_and_ids(rand_teacher):
    t = rand_teacher
    texts, ids = t.generate(SOURCES, steps=3, method="ddim", return_ids=True)
    assert isinstance(texts, list) and len(texts) == len(SOURCES) and all(isinstance(s, str) for s in texts)
    assert ids.shape == (len(SOURCES), t.config.seq_len) and ids.dtype.kind == "i"
    enc, mask = t.encode_sources(SOURCES)
    # the source part is kept, and the target part decodes to the returned texts
    assert np.array_equal(ids[mask == 0], enc[mask == 0])
    assert decode_targets(ids, mask, t.tokenizer) == texts
    assert ids.min() >= 0 and ids.max() < t.config.vocab_size


def test_generate_is_deterministic_per_seed(rand_teacher):
    t = rand_teacher
    a = t.generate(SOURCES, steps=4, method="ddim", seed=11, return_ids=True)[1]
    b = t.generate(SOURCES, steps=4, method="ddim", seed=11, return_ids=True)[1]
    c = t.generate(SOURCES, steps=4, method="ddim", seed=12, return_ids=True)[1]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_generate_candidates_and_mbr(rand_teacher):
    t = rand_teacher
    texts, ids, cands = t.generate(SOURCES, steps=3, method="ddim", num_candidates=3, seed=4,
                                   return_ids=True, return_candidates=True)
    assert [len(c) for c in cands] == [3] * len(SOURCES)
    assert texts == mbr_select(cands)
    assert all(h in c for h, c in zip(texts, cands))
    _, mask = t.encode_sources(SOURCES)
    assert decode_targets(ids, mask, t.tokenizer) == texts
    # candidate s uses the same seed as a single-candidate run would for s = 0
    single, single_cands = t.generate(SOURCES, steps=3, method="ddim", seed=4, return_candidates=True)
    assert single == [c[0] for c in cands]
    assert single_cands == [[s] for s in single]
    assert any(len(set(c)) > 1 for c in cands), "random weights should give differing candidates"


def test_generate_progress_and_batching(rand_teacher):
    t = rand_teacher
    calls = []
    t.generate(SOURCES, steps=3, method="ddim", batch_size=2, num_candidates=2, progress=calls.append)
    assert sum(calls) == 3 * 3 * 2  # steps x batches x candidates
    calls.clear()
    t.generate(SOURCES[:2], progress=calls.append)  # ancestral: all T steps
    assert sum(calls) == t.diffusion.T


def test_generate_ancestral(rand_teacher):
    t = rand_teacher
    a = t.generate(SOURCES, seed=2, return_ids=True)[1]
    b = t.generate(SOURCES, steps=t.diffusion.T, method="ancestral", seed=2, return_ids=True)[1]
    assert np.array_equal(a, b)
    # ddim with k = T is a different (deterministic) sampler
    t.generate(SOURCES[:1], steps=t.diffusion.T, method="ddim")


def test_generate_errors(rand_teacher):
    t = rand_teacher
    with pytest.raises(ValueError, match="ancestral"):
        t.generate(SOURCES, steps=5, method="ancestral")
    with pytest.raises(ValueError, match="method"):
        t.generate(SOURCES, steps=5, method="euler")
    with pytest.raises(ValueError):
        t.generate(SOURCES, steps=0, method="ddim")
    with pytest.raises(ValueError):
        t.generate(SOURCES, steps=t.diffusion.T + 1, method="ddim")
    with pytest.raises(ValueError, match="num_candidates"):
        t.generate(SOURCES, num_candidates=0)
    with pytest.raises(TypeError):
        t.generate("a single string", steps=2, method="ddim")


def test_generate_empty_sources(rand_teacher):
    texts, ids = rand_teacher.generate([], steps=2, method="ddim", return_ids=True)
    assert texts == [] and ids.shape[0] == 0


def test_generate_empty_sources_with_candidates(rand_teacher):
    texts, ids = rand_teacher.generate([], steps=2, method="ddim", num_candidates=2, return_ids=True)
    assert texts == [] and ids.shape[0] == 0


def test_save_load_roundtrip(rand_teacher, tmp_path):
    t = rand_teacher
    path = t.save(tmp_path / "teacher")
    assert sorted(p.name for p in path.iterdir()) == ["SHA256SUMS", "config.json", "model.safetensors", "vocab.txt"]
    for loaded in (dlmone.load(path), Teacher.load(path), dlmone.load(str(path))):
        assert isinstance(loaded, Teacher)
        assert loaded.config == t.config and loaded.tokenizer == t.tokenizer
        assert loaded.info == {"note": "random"}
        assert np.array_equal(loaded.model.params, t.model.params)
        for k, v in t.model.state_dict().items():
            assert np.array_equal(loaded.model.state_dict()[k], v), k
        kw = dict(steps=5, method="ddim", seed=9, num_candidates=2, return_ids=True, return_candidates=True)
        a, b = t.generate(SOURCES, **kw), loaded.generate(SOURCES, **kw)
        assert a[0] == b[0] and a[2] == b[2] and np.array_equal(a[1], b[1])
    assert repr(loaded).startswith("Teacher(params=")
    # lm_head.weight is tied: not stored twice
    assert "lm_head.weight" not in ckpt.load_tensors(path / "model.safetensors")
    # saving again over an existing folder replaces it
    t.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]


# ------------------------------------------------------------------ from_diffuseq
V_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "why", "is", "sky", "blue", "what", "how",
           "do", "i", "learn", "to", "cook", "you", "are", "good", "bad", "big", "small", "red"]
E, H, DT, A, NL, F, MAXPOS, LSEQ, T_IMP = 8, 16, 6, 2, 2, 24, 32, 12, 100


def _torch():
    return pytest.importorskip("torch")


def _diffuseq_files(tmp_path, prefix="", position_ids=True, drop=(), args_over=None, vocab_extra=0, seed=0):
    """A DiffuSeq-like checkpoint from the torch reference: (pt, args, vocab, ref)."""
    torch = _torch()
    from reference import TorchDiffuSeq

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + V_WORDS + [f"w{i}" for i in range(vocab_extra)]
    vocab_path = tmp_path / "vocab.txt"
    vocab_path.write_text("\n".join(vocab) + "\n")
    V = 5 + len(V_WORDS)
    cfg = SimpleNamespace(vocab_size=V, emb_dim=E, hidden_dim=H, num_layers=NL, num_heads=A, ffn_dim=F,
                          time_dim=DT, dropout=0.0, max_positions=MAXPOS, seq_len=LSEQ, diffusion_steps=T_IMP)
    torch.manual_seed(seed)
    ref = TorchDiffuSeq(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    state = dict(ref.state_dict())
    if position_ids:
        state["position_ids"] = torch.arange(MAXPOS, dtype=torch.int64)[None]
    for k in drop:
        del state[k]
    state = {prefix + k: v for k, v in state.items()}
    pt = tmp_path / "ema_0.9999_000100.pt"
    torch.save(state, pt)
    args = {"hidden_dim": E, "hidden_t_dim": DT, "seq_len": LSEQ, "diffusion_steps": T_IMP, "dropout": 0.1,
            "noise_schedule": "sqrt", "rescale_timesteps": True, "vocab": "bert", "learn_sigma": False,
            "use_kl": False, "predict_xstart": True, "config_name": "bert-base-uncased"}
    args.update(args_over or {})
    args_path = tmp_path / "training_args.json"
    args_path.write_text(json.dumps(args))
    return pt, args_path, vocab_path, ref


@pytest.mark.parametrize("prefix", ["", "module."])
def test_from_diffuseq_matches_torch(tmp_path, prefix):
    torch = _torch()
    pt, args, vocab, ref = _diffuseq_files(tmp_path, prefix=prefix)
    t = dlmone.from_diffuseq(pt, args, vocab, num_heads=A)
    assert isinstance(t, Teacher)
    c = t.config
    assert (c.vocab_size, c.emb_dim, c.hidden_dim, c.num_layers, c.num_heads, c.ffn_dim, c.time_dim) == \
        (5 + len(V_WORDS), E, H, NL, A, F, DT)
    assert (c.seq_len, c.max_positions, c.diffusion_steps, c.dropout) == (LSEQ, MAXPOS, T_IMP, 0.1)
    assert t.diffusion.T == T_IMP and t.tokenizer.vocab_size == c.vocab_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, LSEQ, E)).astype(np.float32)
    t_int = np.array([0, 37, T_IMP - 1])
    y = t.model.forward(x, t_int)
    with torch.no_grad():
        y_ref = ref.forward_int(torch.from_numpy(x), t_int).numpy()
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=0)
    # word embeddings and the tied output head
    np.testing.assert_array_equal(t.model.state_dict()["word_embedding.weight"],
                                  ref.word_embedding.weight.detach().numpy())
    h = rng.standard_normal((2, LSEQ, E)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(t.model.logits(h), ref.get_logits(torch.from_numpy(h)).numpy(), atol=1e-5)


def test_from_diffuseq_default_heads_and_roundtrip(tmp_path):
    pt, args, vocab, _ = _diffuseq_files(tmp_path, position_ids=False)
    t = dlmone.from_diffuseq(str(pt), str(args), str(vocab))
    assert t.config.num_heads == 1  # BERT's convention hidden/64, at least 1
    assert t.info["diffuseq_args"]["hidden_t_dim"] == DT
    out = t.generate(["why is the sky blue", "how do i learn to cook"], steps=3, method="ddim")
    assert len(out) == 2
    t.save(tmp_path / "imported")
    t2 = dlmone.load(tmp_path / "imported")
    assert np.array_equal(t2.model.params, t.model.params) and t2.info == json.loads(json.dumps(t.info))
    assert t2.generate(["why is the sky blue", "how do i learn to cook"], steps=3, method="ddim") == out


def test_from_diffuseq_errors(tmp_path):
    torch = _torch()
    cases = {
        "vocab": dict(vocab_extra=3),
        "linear": dict(args_over={"noise_schedule": "linear"}),
        "rescale": dict(args_over={"rescale_timesteps": False}),
        "hidden": dict(args_over={"hidden_dim": 128}),
        "seq_len": dict(args_over={"seq_len": MAXPOS + 1}),
        "no_emb": dict(drop=("word_embedding.weight", "lm_head.weight")),
        "no_ln": dict(drop=("LayerNorm.bias",)),
        "no_pos": dict(drop=("position_embeddings.weight",)),
    }
    for name, kw in cases.items():
        d = tmp_path / name
        d.mkdir()
        pt, args, vocab, _ = _diffuseq_files(d, **kw)
        with pytest.raises(ValueError):
            dlmone.from_diffuseq(pt, args, vocab, num_heads=A)
    # an unexpected extra tensor
    d = tmp_path / "extra"
    d.mkdir()
    pt, args, vocab, _ = _diffuseq_files(d)
    state = torch.load(pt, weights_only=True)
    state["decoder.weight"] = torch.zeros(3, 3)
    torch.save(state, pt)
    with pytest.raises(ValueError):
        dlmone.from_diffuseq(pt, args, vocab, num_heads=A)
    # not a state dict; invalid JSON args
    torch.save([torch.zeros(2)], d / "list.pt")
    with pytest.raises(ValueError):
        dlmone.from_diffuseq(d / "list.pt", args, vocab)
    (d / "bad.json").write_text("{nope")
    with pytest.raises(ValueError):
        dlmone.from_diffuseq(pt, d / "bad.json", vocab)


def test_from_diffuseq_missing_time_embed_is_value_error(tmp_path):
    pt, args, vocab, _ = _diffuseq_files(tmp_path, drop=("time_embed.0.weight",))
    with pytest.raises(ValueError):
        dlmone.from_diffuseq(pt, args, vocab, num_heads=A)


def test_non_finite_steps_are_skipped_then_training_stops(data, tmp_path, monkeypatch):
    """A NaN gradient skips that update (counted in the log); N in a row stop training
    with a clear error and leave the last checkpoint loadable."""
    import dlmone.teacher as teacher_module

    real = teacher_module.training_loss
    poisoned = {"steps": {2}}
    calls = {"n": 0}

    def poisoning_loss(model, *a, **kw):
        terms = real(model, *a, **kw)
        calls["n"] += 1
        if calls["n"] in poisoned["steps"]:
            model.grad_buffer[5] = np.nan
        return terms

    monkeypatch.setattr(teacher_module, "training_loss", poisoning_loss)
    train_teacher(_cfg(steps=6, max_bad_steps=3), data, tmp_path / "a", progress=False, print_fn=lambda s: None)
    records = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert max(r.get("skipped_steps", 0) for r in records) == 1
    assert np.isfinite(dlmone.load(tmp_path / "a" / "teacher").model.params).all()

    calls["n"] = 0
    poisoned["steps"] = set(range(4, 100))  # steps 1-3 fine (checkpoint at 3), then all NaN
    with pytest.raises(FloatingPointError, match="3 consecutive"):
        train_teacher(_cfg(steps=9, max_bad_steps=3), data, tmp_path / "b", progress=False,
                      print_fn=lambda s: None)
    last = (tmp_path / "b" / "checkpoints" / "latest").read_text().strip()
    assert last == "step-00000003"
    state = ckpt.load_tensors(tmp_path / "b" / "checkpoints" / last / "state.safetensors")
    assert np.isfinite(state["params"]).all()


def test_eval_bleu_and_cpu_time_in_the_log(data, tmp_path):
    """eval_bleu scores DDIM samples of the first validation pairs at every validation,
    and the log carries the CPU seconds of the training steps (the budget study's axes)."""
    cfg = _cfg(steps=8, eval_every=4, save_every=4, eval_bleu=6, eval_bleu_steps=3)
    train_teacher(cfg, data, tmp_path, **QUIET)
    log = _read_log(tmp_path / "log.jsonl")
    evals = [r for r in log if "val_bleu" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert 0.0 <= r["val_bleu"] <= 1.0 and 0.0 <= r["val_empty"] <= 1.0
    cpu = [r["train_cpu_s"] for r in log if "loss" in r]
    assert cpu == sorted(cpu) and cpu[0] > 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="eval_bleu"):
            _cfg(eval_bleu=bad)
    with pytest.raises(ValueError, match="eval_bleu_steps"):
        _cfg(eval_bleu_steps=0)


def test_for_preset_puts_the_recipe_under_the_given_fields():
    from dlmone.teacher import PRESET_RECIPES

    cfg = TeacherConfig.for_preset("small", steps=7, model={"num_layers": 2}, lr=3e-4)
    assert cfg.steps == 7 and cfg.lr == 3e-4  # given
    assert cfg.soft_absorb == PRESET_RECIPES["small"]["soft_absorb"] == 0.5  # the recipe
    assert cfg.model == {"dropout": 0.0, "num_layers": 2}
    assert TeacherConfig.for_preset("tiny") == TeacherConfig(preset="tiny")  # no recipe: the defaults
    with pytest.raises(ValueError, match="preset"):
        TeacherConfig.for_preset("huge")


def test_teacher_from_checkpoint(straight, tmp_path):
    from dlmone.teacher import teacher_from_checkpoint

    final = Teacher.load(straight / "teacher")
    latest = teacher_from_checkpoint(straight)  # the run folder: its latest checkpoint, the last step
    assert np.array_equal(latest.model.params, final.model.params)
    assert latest.info["checkpoint_step"] == _cfg(**RESUME).steps
    assert latest.tokenizer.vocab == final.tokenizer.vocab
    steps = sorted((straight / "checkpoints").glob("step-*"))
    earlier = teacher_from_checkpoint(steps[0])
    assert earlier.info["checkpoint_step"] == int(steps[0].name.split("-")[1])
    assert not np.array_equal(earlier.model.params, final.model.params)
    with pytest.raises(ValueError, match="checkpoint"):
        teacher_from_checkpoint(tmp_path)
