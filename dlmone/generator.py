"""The generator base class: :class:`SequenceModel`, what a teacher
(:mod:`dlmone.teacher`) and a student (:mod:`dlmone.distill`) share: a network, its
tokenizer and diffusion, batched generation with MBR, saving and loading a model folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import numpy as np

from . import checkpoint as ckpt
from .checkpoint import PathLike
from .data import decode_targets, encode_sources
from .diffusion import DECODERS, Diffusion, decode_tokens, derive_seed
from .distributed import LocalComm
from .metrics import mbr_select
from .model import DiffusionTransformer, ModelConfig
from .sample import batched, candidate_seeds
from .tokenizer import Tokenizer

M = TypeVar("M", bound="SequenceModel")


class SequenceModel:
    """What teachers and students share: a network, its tokenizer, its diffusion,
    encoding of sources and decoding of outputs, saving and loading."""

    kind = "model"

    def __init__(self, model: DiffusionTransformer, tokenizer: Tokenizer, info: Dict[str, Any]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.diffusion = Diffusion(model.config.diffusion_steps)
        self.info = info

    def encode_sources(self, sources: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        if isinstance(sources, str):
            raise TypeError("sources must be a list of strings, not a single str")
        return encode_sources(sources, self.tokenizer, self.config.seq_len)

    def output_ids(self, x: np.ndarray, ids: np.ndarray, mask: np.ndarray, decode: str = "logits") -> np.ndarray:
        """Token ids of generated embeddings x: decoded on the target positions, the
        source's ids elsewhere."""
        targets = mask > 0
        return np.where(targets, decode_tokens(self.model, x, decode, targets), ids)

    def _generate(self, sources: Sequence[str], sample: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
                  num_candidates: int, seed: int, batch_size: int, return_ids: bool,
                  return_candidates: bool, comm: Optional[LocalComm], precision: Optional[str] = None,
                  decode: str = "logits") -> Any:
        """Batched generation of S candidates per source (``sample(x_src, mask, seed)`` -> x0),
        decoding, and the MBR choice when S > 1. With a communicator of K ranks the
        (candidate, batch) pairs are dealt round robin to the ranks and the token ids
        gathered: every rank returns the whole, single-process result. ``precision``
        ("float32" or "bf16" on AMX) applies to this call only (None: the model's
        ``inference_precision``). ``decode``: how embeddings become tokens
        (:func:`dlmone.diffusion.decode_tokens`)."""
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {DECODERS}, got {decode!r}")
        if precision is not None:
            before = self.model.inference_precision
            self.model.inference_precision = precision  # raises where AMX-BF16 is missing
            try:
                return self._generate(sources, sample, num_candidates, seed, batch_size, return_ids,
                                      return_candidates, comm, decode=decode)
            finally:
                self.model.inference_precision = before
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids, mask = self.encode_sources(sources)
        if not len(sources):
            out0: List[Any] = [[]] + ([ids.astype(np.int64)] if return_ids else []) + ([[]] if return_candidates else [])
            return out0[0] if len(out0) == 1 else tuple(out0)
        comm = LocalComm() if comm is None else comm
        x_src = self.model.embed(ids)
        batches = batched(len(sources), batch_size)
        seeds = candidate_seeds(seed, num_candidates)
        jobs = [(c, b) for c in range(num_candidates) for b in range(len(batches))]
        done: Dict[Tuple[int, int], np.ndarray] = {}
        for j, (c, b) in enumerate(jobs):
            if comm.owns(j):
                sl = batches[b]
                done[c, b] = self.output_ids(sample(x_src[sl], mask[sl], derive_seed(seeds[c], b)),
                                             ids[sl], mask[sl], decode)
        for part in comm.allgather(done):
            done.update(part)
        cand_ids = [np.concatenate([done[c, b] for b in range(len(batches))]) for c in range(num_candidates)]
        texts_by_candidate = [decode_targets(tok, mask, self.tokenizer) for tok in cand_ids]
        cands = [list(texts) for texts in zip(*texts_by_candidate)]
        if num_candidates == 1:
            texts, chosen_ids = [c[0] for c in cands], cand_ids[0]
        else:
            texts = mbr_select(cands)
            pick = [c.index(t) for c, t in zip(cands, texts)]
            chosen_ids = np.stack([cand_ids[p][i] for i, p in enumerate(pick)])
        out: List[Any] = [texts]
        if return_ids:
            out.append(chosen_ids)
        if return_candidates:
            out.append(cands)
        return out[0] if len(out) == 1 else tuple(out)

    def save(self, path: PathLike) -> Path:
        """Write the model folder atomically (config.json, model.safetensors, vocab.txt)."""
        meta = {"kind": self.kind, "model": self.config.to_dict(), **self.info}

        def fill(tmp: Path) -> None:
            (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            weights = {k: v for k, v in self.model.state_dict().items() if k != "lm_head.weight"}
            ckpt.save_tensors(tmp / "model.safetensors", weights)
            self.tokenizer.save(tmp)

        return ckpt.atomic_write_dir(path, fill)

    @classmethod
    def load(cls: Type[M], path: PathLike) -> M:
        """The model in folder ``path``, which must hold a ``cls.kind``."""
        meta, model, tokenizer = cls.read_folder(path)
        if meta["kind"] != cls.kind:
            raise ValueError(f"{path} holds a {meta['kind']}, not a {cls.kind}")
        return cls(model, tokenizer, {k: v for k, v in meta.items() if k not in ("kind", "model")})

    @staticmethod
    def read_folder(path: PathLike) -> Tuple[Dict[str, Any], DiffusionTransformer, Tokenizer]:
        path = ckpt.resolve_dir(path)
        ckpt.verify_checksums(path)
        meta = ckpt.read_json(path / "config.json")
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or "kind" not in meta:
            raise ValueError(f"{path}/config.json is not a dlmone model config")
        try:
            config = ModelConfig.from_dict(meta["model"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}/config.json: {e}") from None
        model = DiffusionTransformer(config)
        tensors = ckpt.load_tensors(path / "model.safetensors")
        expected = {k: shape for k, (_, shape) in model.layout.items()}
        ckpt.check_tensors(tensors, expected, str(path / "model.safetensors"))
        model.load_state_dict(tensors)
        tokenizer = Tokenizer.load(path)
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"{path}: vocab.txt has {tokenizer.vocab_size} tokens but the model "
                             f"expects {config.vocab_size}")
        return meta, model, tokenizer

    def __repr__(self) -> str:
        c = self.config
        config = self.info.get("teacher_config")
        vocab_file = config.get("vocab_file") if isinstance(config, dict) else None
        vocabulary = f"{self.tokenizer.vocab_size} WordPiece tokens, lower-cased" + (
            f", from {Path(vocab_file).name}" if vocab_file else "")
        return (f"{type(self).__name__}(params={self.model.num_parameters():,}, layers={c.num_layers}, "
                f"hidden={c.hidden_dim}, emb={c.emb_dim}, heads={c.num_heads}, vocab={c.vocab_size}, "
                f"seq_len={c.seq_len}, T={c.diffusion_steps}, vocabulary='{vocabulary}', "
                f"precision={self.model.inference_precision})")
