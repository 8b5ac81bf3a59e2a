"""Import a teacher trained by DiffuSeq (Gong et al.): its EMA checkpoint (a torch
state dict), its ``training_args.json`` and the BERT ``vocab.txt`` it used.

PyTorch is needed for this function only (to read the ``.pt`` file); it is loaded with
``weights_only=True``, so the file cannot run code.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np

from .model import DiffusionTransformer, ModelConfig
from .teacher import Teacher
from .tokenizer import Tokenizer

PathLike = Union[str, Path]
_LAYER = re.compile(r"^input_transformers\.layer\.(\d+)\.")


def from_diffuseq(checkpoint: PathLike, training_args: PathLike, vocab: PathLike,
                  num_heads: Optional[int] = None) -> Teacher:
    """Load a DiffuSeq teacher into dlmone.

    Sizes come from the state dict (hidden size, layers, feed-forward, positions) and
    ``training_args.json`` (``hidden_dim`` is DiffuSeq's embedding size E,
    ``hidden_t_dim`` the time dimension, ``seq_len``, ``diffusion_steps``, ``dropout``).
    The head count cannot be read from weights: by default it is BERT's convention,
    hidden/64 (12 for bert-base). The schedule must be DiffuSeq's "sqrt".
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError("from_diffuseq reads a torch checkpoint: pip install torch") from e
    args_path = Path(training_args)
    try:
        args: Dict[str, Any] = json.loads(args_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{args_path} is not valid JSON: {e}") from None
    schedule = args.get("noise_schedule", "sqrt")
    if schedule != "sqrt":
        raise ValueError(f"{args_path}: noise_schedule {schedule!r} is not supported (dlmone implements 'sqrt')")
    if not args.get("rescale_timesteps", True):
        raise ValueError(f"{args_path}: rescale_timesteps=false is not supported")
    raw = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{checkpoint} does not hold a state dict")
    state: Dict[str, np.ndarray] = {}
    for key, value in raw.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key == "position_ids":  # a buffer of arange indices, not a parameter
            continue
        state[key] = value.detach().to(torch.float32).cpu().numpy()
    for key in ("word_embedding.weight", "position_embeddings.weight", "time_embed.0.weight",
                "input_transformers.layer.0.intermediate.dense.weight"):
        if key not in state:
            raise ValueError(f"{checkpoint} lacks {key}: not a DiffuSeq TransformerNetModel")
    V, E = state["word_embedding.weight"].shape
    max_pos, H = state["position_embeddings.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state if (m := _LAYER.match(k)))
    F = state["input_transformers.layer.0.intermediate.dense.weight"].shape[0]
    Dt = state["time_embed.0.weight"].shape[1]
    if "hidden_dim" in args and int(args["hidden_dim"]) != E:
        raise ValueError(f"training_args hidden_dim={args['hidden_dim']} but the embedding has {E} columns")
    config = ModelConfig(vocab_size=V, seq_len=int(args.get("seq_len", max_pos)), emb_dim=E, hidden_dim=H,
                         num_layers=layers, num_heads=num_heads or max(1, H // 64), ffn_dim=F, time_dim=Dt,
                         dropout=float(args.get("dropout", 0.1)),
                         diffusion_steps=int(args.get("diffusion_steps", 2000)), max_positions=max_pos)
    model = DiffusionTransformer(config)
    model.load_state_dict(state, strict=True)
    tokenizer = Tokenizer.from_vocab_file(vocab)
    if tokenizer.vocab_size != V:
        raise ValueError(f"{vocab} has {tokenizer.vocab_size} tokens but the checkpoint's vocabulary has {V}")
    return Teacher(model, tokenizer, {"imported_from": str(checkpoint), "diffuseq_args": args})
