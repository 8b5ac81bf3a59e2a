"""The network f(x_t, t) of SPEC §3 (DiffuSeq's TransformerNetModel), backed by C.

Parameters and gradients each live in one contiguous float32 buffer owned by the C
core; every named tensor (DiffuSeq's state-dict keys) is a zero-copy numpy view
into it. Inputs of any float dtype and layout are copied to C-contiguous float32;
non-float arrays raise TypeError. NaN in an input propagates to the output (it is
not checked here; the training loops detect non-finite losses and gradients).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from . import _core

_FLOAT_KINDS = "f"


def as_float32(a: Any, name: str) -> np.ndarray:
    """C-contiguous float32 copy (or the array itself) of a float array-like."""
    arr = np.asarray(a)
    if arr.dtype.kind not in _FLOAT_KINDS:
        raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def as_tokens(a: Any, name: str = "tokens") -> np.ndarray:
    """C-contiguous int64 array of token ids."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


class PrecisionUnavailableError(RuntimeError):
    """bf16 was asked for where it cannot run: the CPU or the build has no AMX-BF16."""


@dataclass
class ModelConfig:
    """Sizes of the network (SPEC §3) and of its diffusion (SPEC §4).

    ``max_positions`` is the number of rows of ``position_embeddings`` (DiffuSeq
    keeps BERT's 512); it defaults to ``seq_len``.

    Two teacher-recipe options (SPEC §5.1) change the network; both off is DiffuSeq's
    network, bit for bit:

    - ``self_conditioning`` (Chen, Zhang & Hinton, "Analog Bits"): the input is
      concat(x_t, x0_self_cond), 2E channels. With E != H ``input_up_proj.0`` becomes a
      Linear(2E -> H); with E == H (DiffuSeq has no input projection then) one new layer,
      ``self_cond_proj`` Linear(2E -> H), projects the input. ``forward(...,
      x_self_cond=None)`` feeds zeros.
    - ``mask_embedding``: one more tensor, ``mask_embedding`` [E], initialised N(0, 1)
      like a word embedding: the learned [MASK] vector of DiffuSeq-v2's soft absorbing
      state (``TeacherConfig.soft_absorb`` turns it on). The forward does not read it.
    """

    vocab_size: int
    seq_len: int
    emb_dim: int = 128
    hidden_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    time_dim: int = 128
    dropout: float = 0.1
    diffusion_steps: int = 2000
    max_positions: Optional[int] = None
    layer_norm_eps: float = 1e-12
    self_conditioning: bool = False
    mask_embedding: bool = False

    def __post_init__(self) -> None:
        if self.max_positions is None:
            self.max_positions = self.seq_len
        for name in ("vocab_size", "seq_len", "emb_dim", "hidden_dim", "num_layers", "num_heads",
                     "ffn_dim", "time_dim", "diffusion_steps", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.time_dim < 2:
            raise ValueError(f"time_dim must be at least 2, got {self.time_dim}")
        if self.max_positions < self.seq_len:
            raise ValueError(f"max_positions ({self.max_positions}) must be >= seq_len ({self.seq_len})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not float(self.layer_norm_eps) > 0.0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        for name in ("self_conditioning", "mask_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}")
        return cls(**dict(d))

    @classmethod
    def tiny(cls, vocab_size: int = 1000, seq_len: int = 32, **kw: Any) -> "ModelConfig":
        """A few hundred thousand parameters: the built-in task and tests."""
        base = dict(emb_dim=32, hidden_dim=64, num_layers=2, num_heads=4, ffn_dim=256,
                    time_dim=32, dropout=0.0)
        base.update(kw)
        return cls(vocab_size=vocab_size, seq_len=seq_len, **base)

    @classmethod
    def small(cls, vocab_size: int = 6000, seq_len: int = 32, **kw: Any) -> "ModelConfig":
        """SPEC §6.5a's CPU-sized teacher (E=64, H=128, 3 layers, 4 heads, F=512)."""
        base = dict(emb_dim=64, hidden_dim=128, num_layers=3, num_heads=4, ffn_dim=512,
                    time_dim=64, dropout=0.1)
        base.update(kw)
        return cls(vocab_size=vocab_size, seq_len=seq_len, **base)

    @classmethod
    def diffuseq_base(cls, vocab_size: int = 30522, seq_len: int = 128, **kw: Any) -> "ModelConfig":
        """DiffuSeq's published size: 12 x 768 BERT encoder, E=128, about 91M parameters."""
        base = dict(emb_dim=128, hidden_dim=768, num_layers=12, num_heads=12, ffn_dim=3072,
                    time_dim=128, dropout=0.1, max_positions=512)
        base.update(kw)
        return cls(vocab_size=vocab_size, seq_len=seq_len, **base)

    PRESETS = ("tiny", "small", "diffuseq_base")

    @classmethod
    def preset(cls, name: str, **kw: Any) -> "ModelConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {cls.PRESETS}")
        return getattr(cls, name)(**kw)


class DiffusionTransformer:
    """x0-predicting transformer f(x_t, t) with exact forward and backward in C.

    ``forward`` keeps the activations that ``backward`` needs; one model is used by
    one thread at a time (a second thread gets a RuntimeError, never a race).

    ``precision = "bf16"`` is mixed-precision training and inference on Intel AMX: every
    linear layer's product (forward, both backward products, and the tied logits) takes
    bf16 inputs and accumulates in float32; parameters, gradients, the optimiser, LayerNorm,
    softmax, attention and the losses stay float32. ``inference_precision = "bf16"`` does
    the same for inference forwards (``train=False``) only, with a bf16 copy of the weights
    packed once and refreshed whenever the parameters change (about 2x faster on
    ``diffuseq_base``). The backward of a bf16 forward runs its products in bf16.
    """

    PRECISIONS = ("float32", "bf16")

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.seed = int(seed)
        c = config
        self._core = _core.Model(c.vocab_size, c.emb_dim, c.hidden_dim, c.num_layers, c.num_heads,
                                 c.ffn_dim, c.time_dim, c.max_positions, float(c.dropout),
                                 float(c.layer_norm_eps), self.seed,
                                 self_conditioning=c.self_conditioning,
                                 mask_embedding=c.mask_embedding)
        self.params: np.ndarray = self._core.params
        self.grad_buffer: np.ndarray = self._core.grads
        self.layout: Dict[str, Tuple[int, Tuple[int, ...]]] = {
            name: (off, tuple(shape)) for name, off, shape in self._core.layout()}
        self._params = self._views(self.params)
        self._grads = self._views(self.grad_buffer)
        self.dropout_calls = 0  # advances the dropout stream of train-mode forwards
        self._precision = "float32"
        self._inference_precision = "float32"

    @classmethod
    def check_precision(cls, name: str, value: str) -> str:
        """``value`` if it names a precision this machine can run; ValueError for an
        unknown one, PrecisionUnavailableError for bf16 without AMX-BF16."""
        if value not in cls.PRECISIONS:
            raise ValueError(f"{name} must be one of {cls.PRECISIONS}, got {value!r}")
        if value == "bf16" and not _core.build_info()["amx_bf16"]:
            raise PrecisionUnavailableError(f"{name}='bf16' needs a CPU with AMX-BF16 (Intel Sapphire "
                                            "Rapids or later); this machine or build has none")
        return value

    @property
    def precision(self) -> str:
        """Of every product, training included: "float32" (default) or "bf16"."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = self.check_precision("precision", value)

    @property
    def inference_precision(self) -> str:
        """Of inference forwards (which run in bf16 when this or ``precision`` says so)."""
        return self._inference_precision

    @inference_precision.setter
    def inference_precision(self, value: str) -> None:
        self._inference_precision = self.check_precision("inference_precision", value)

    def _views(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        views = {name: flat[off:off + int(np.prod(shape))].reshape(shape)
                 for name, (off, shape) in self.layout.items()}
        views["lm_head.weight"] = views["word_embedding.weight"]  # tied
        return views

    # -- timesteps ----------------------------------------------------------------
    def scale_timesteps(self, t: Any, batch: int) -> np.ndarray:
        """Integer timesteps in [0, T) -> the network's float scale t*1000/T (SPEC §4)."""
        arr = np.asarray(t)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"t must be integer timesteps (use rescaled=True for floats), got {arr.dtype}")
        if arr.ndim == 0:
            arr = np.full(batch, int(arr))
        if arr.shape != (batch,):
            raise ValueError(f"t has shape {arr.shape}, expected ({batch},)")
        T = self.config.diffusion_steps
        if arr.size and (arr.min() < 0 or arr.max() >= T):
            raise ValueError(f"t must lie in [0, {T}), got values in [{arr.min()}, {arr.max()}]")
        return arr.astype(np.float32) * np.float32(1000.0 / T)

    # -- network ------------------------------------------------------------------
    def forward(self, x: Any, t: Any, train: bool = False, rescaled: bool = False,
                seed: Optional[int] = None, row_offset: int = 0,
                x_self_cond: Any = None) -> np.ndarray:
        """Predict x0 from x_t. x: [B,L,E]; t: integer timesteps [B] (or a scalar), or
        already-rescaled float timesteps with ``rescaled=True``. With ``train=True``
        dropout is on; its masks come from ``seed`` (default: a stream derived from the
        model seed that advances every call). ``row_offset`` says that these rows are
        rows ``row_offset...`` of a larger batch: a data-parallel shard then gets exactly
        the dropout masks the whole batch would. ``x_self_cond`` [B,L,E]: the
        self-conditioning input of a ``self_conditioning`` model (None: zeros); it gets
        no gradient in ``backward``."""
        x = as_float32(x, "x")
        if x.ndim != 3:
            raise ValueError(f"x must have 3 dimensions [B, L, E], got shape {x.shape}")
        B = x.shape[0]
        if rescaled:
            tf = as_float32(t, "t")
            if tf.ndim == 0:
                tf = np.full(B, tf, dtype=np.float32)
        else:
            tf = self.scale_timesteps(t, B)
        if train and seed is None:
            seed = (self.seed * 1_000_003 + self.dropout_calls) & (2**64 - 1)
            self.dropout_calls += 1
        bf16 = self._precision == "bf16" or (not train and self._inference_precision == "bf16")
        sc = None if x_self_cond is None else as_float32(x_self_cond, "x_self_cond")
        return self._core.forward(x, tf, bool(train), int(seed or 0) & (2**64 - 1), bf16,
                                  int(row_offset), sc)

    __call__ = forward

    def backward(self, grad_out: Any, grad_hidden: Any = None, param_grads: bool = True) -> np.ndarray:
        """Back-propagate d(loss)/d(output) through the last forward; returns d/dx.
        Parameter gradients are accumulated (``param_grads=False`` skips them).
        ``grad_hidden`` [B,L,H] adds a gradient on the last encoder hidden state."""
        gh = None if grad_hidden is None else as_float32(grad_hidden, "grad_hidden")
        return self._core.backward(as_float32(grad_out, "grad_out"), gh, bool(param_grads))

    @property
    def hidden(self) -> np.ndarray:
        """The last encoder layer's output of the last forward, [B,L,H] (a copy)."""
        return self._core.hidden()

    def logits(self, h: Any) -> np.ndarray:
        """Tied output head: h·Wᵀ + b over the word embedding W, [...,E] -> [...,V]."""
        return self._core.logits(as_float32(h, "h"), self._precision == "bf16")

    def logits_backward(self, h: Any, grad_logits: Any) -> np.ndarray:
        return self._core.logits_backward(as_float32(h, "h"), as_float32(grad_logits, "grad_logits"),
                                          self._precision == "bf16")

    def tied_cross_entropy(self, h: Any, tokens: Any, scale: Any,
                           grads: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The rounding loss through the tied head without materialising the logits:
        per row of h [..., E], nll = -log softmax(h·Wᵀ + b)[token] (shape of tokens). With
        ``grads``, also d(Σ scale·nll)/dh [..., E], and the word_embedding and
        lm_head.bias gradients accumulate that sum's; else (nll, None)."""
        h = as_float32(h, "h")
        tok = np.asarray(tokens)
        if tok.dtype.kind not in "iu":
            raise TypeError(f"tokens must be integers, got {tok.dtype}")
        if h.shape[:-1] != tok.shape:
            raise ValueError(f"tokens have shape {tok.shape}, h {h.shape}: expected h = tokens.shape + (E,)")
        sc = as_float32(scale, "scale")
        if sc.shape != tok.shape:
            raise ValueError(f"scale has shape {sc.shape}, expected {tok.shape}")
        E = h.shape[-1]
        nll, dh = self._core.tied_cross_entropy(h.reshape(-1, E), tok.reshape(-1).astype(np.int64),
                                                sc.reshape(-1), bool(grads), self._precision == "bf16")
        return nll.reshape(tok.shape), None if dh is None else dh.reshape(h.shape)

    def embed(self, tokens: Any) -> np.ndarray:
        """Word embeddings of token ids [B,L] -> [B,L,E]."""
        return self._core.embed(as_tokens(tokens))

    def embed_backward(self, tokens: Any, grad: Any) -> None:
        self._core.embed_backward(as_tokens(tokens), as_float32(grad, "grad"))

    # -- parameters ---------------------------------------------------------------
    def zero_grad(self) -> None:
        self._core.zero_grad()

    def num_parameters(self) -> int:
        return int(self.params.size)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Zero-copy views named by DiffuSeq's keys (lm_head.weight is word_embedding.weight)."""
        return dict(self._params)

    def grads(self) -> Dict[str, np.ndarray]:
        return dict(self._grads)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Copy tensors in by name. With ``strict``, missing or unexpected keys raise
        ValueError; a wrong shape always does. A tied ``lm_head.weight`` must equal
        ``word_embedding.weight`` when both are given."""
        expected = set(self.layout)
        given = set(state) - {"lm_head.weight"}
        if "word_embedding.weight" not in state and "lm_head.weight" in state:
            given.add("word_embedding.weight")
        if strict:
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            if missing or unexpected:
                raise ValueError(f"state dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
        values = {}
        for name in expected & given:
            src = state[name] if name in state else state["lm_head.weight"]
            arr = np.asarray(src)
            if arr.dtype.kind not in _FLOAT_KINDS:
                raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")
            if arr.shape != self._params[name].shape:
                raise ValueError(f"{name} has shape {arr.shape}, expected {self._params[name].shape}")
            values[name] = arr
        if "lm_head.weight" in state and "word_embedding.weight" in state:
            if not np.array_equal(np.asarray(state["lm_head.weight"]), np.asarray(state["word_embedding.weight"])):
                raise ValueError("lm_head.weight differs from word_embedding.weight (they are tied)")
        for name, arr in values.items():
            np.copyto(self._params[name], arr, casting="same_kind")

    def copy_from(self, other: "DiffusionTransformer") -> None:
        """Copy all parameters of a model of the same config."""
        if other.config.to_dict() != self.config.to_dict():
            raise ValueError("copy_from needs a model of the same config")
        np.copyto(self.params, other.params)

    def __repr__(self) -> str:
        c = self.config
        return (f"DiffusionTransformer(V={c.vocab_size}, E={c.emb_dim}, H={c.hidden_dim}, "
                f"layers={c.num_layers}, heads={c.num_heads}, F={c.ffn_dim}, L={c.seq_len}, "
                f"T={c.diffusion_steps}, params={self.num_parameters():,})")
