"""The Hyper-Search scales file ``scales.pt`` (RepOptimizers §3.3): the constants a RepOpt target
training multiplies its gradients with, one set per CSLA block of a RepVGG-family model.

Layout (a plain dict of tensors and JSON-able values, read back with ``torch.load(weights_only=True)``)::

    {"format": "repsearch.repopt.scales/1",
     "model": "repvgg_b1", "width": 1.0, "model_kwargs": {...every constructor argument...},
     "blocks": [{"path": "stage1.0", "stage": 1, "index": 0, "has_identity": False,
                 "s": (C_out,) float32, "t": (C_out,) float32, "identity": (C_out,) or None}, ...],
     "summary": {"s_mean": ..., "s_abs_mean": ..., "t_mean": ..., "identity_mean": ..., "n_negative_s": ...},
     "sha256": "<hex of the content: model, width, every block's path and tensors>"}

``s`` is the 3x3 branch's per-channel scale, ``t`` the 1x1 branch's, ``identity`` the identity
branch's trainable scale (present iff the block has an identity branch: C_in = C_out, stride 1).
The content hash (not the file's bytes, nor its path) names a target study that depends on it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from repsearch.errors import UserError

FORMAT = "repsearch.repopt.scales/1"


class ScalesError(UserError):
    """A missing, malformed or mismatched scales file (one line: what is wrong, what was expected)."""


def content_sha256(model: str, width: float, blocks: list[dict[str, Any]]) -> str:
    """SHA-256 (hex) of the scales' content: model name, width, and for every block its path, flags
    and the float32 bytes of ``s``, ``t``, ``identity`` (in that order). Independent of the file's
    serialisation and path."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": model, "width": float(width)}, sort_keys=True).encode())
    for b in blocks:
        h.update(json.dumps({k: b[k] for k in ("path", "stage", "index", "has_identity")}, sort_keys=True).encode())
        for key in ("s", "t", "identity"):
            v = b.get(key)
            h.update(key.encode())
            if v is not None:
                h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def summarize(blocks: list[dict[str, Any]]) -> dict[str, float]:
    """Summary statistics over every block's channels: ``s_mean``, ``s_abs_mean``, ``s_std``,
    ``t_mean``, ``t_abs_mean``, ``t_std``, ``identity_mean`` (NaN without identity branches) and
    ``n_negative_s`` / ``n_negative_t`` (channels with a negative searched scale: the Grad Mult uses
    |s| for AdamW because of them). Dimensionless scale values.

    Raises:
        KeyError / RuntimeError: blocks without ``s``/``t`` tensors, or an empty block list.
    """
    s = torch.cat([b["s"].float().flatten() for b in blocks])
    t = torch.cat([b["t"].float().flatten() for b in blocks])
    ids = [b["identity"].float().flatten() for b in blocks if b.get("identity") is not None]
    i = torch.cat(ids) if ids else torch.empty(0)
    return {
        "s_mean": float(s.mean()),
        "s_abs_mean": float(s.abs().mean()),
        "s_std": float(s.std()) if s.numel() > 1 else 0.0,
        "t_mean": float(t.mean()),
        "t_abs_mean": float(t.abs().mean()),
        "t_std": float(t.std()) if t.numel() > 1 else 0.0,
        "identity_mean": float(i.mean()) if i.numel() else math.nan,
        "n_negative_s": int((s < 0).sum()),
        "n_negative_t": int((t < 0).sum()),
    }


def build_scales(model: str, width: float, model_kwargs: dict[str, Any], blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``scales.pt`` payload from per-block scales (tensors detached, moved to CPU float32).

    Args:
        model, width, model_kwargs: the Hyper-Search model's name, width multiplier and constructor
            arguments.
        blocks: per unit ``{"path", "stage", "index", "has_identity", "s" (C_out,), "t" (C_out,),
            "identity" (C_out,) or None}`` in ``model.blocks()`` order.

    Raises:
        KeyError: a block without one of those keys.
    """
    clean = []
    for b in blocks:
        clean.append({
            "path": str(b["path"]), "stage": int(b["stage"]), "index": int(b["index"]),
            "has_identity": bool(b["has_identity"]),
            "s": b["s"].detach().to("cpu", torch.float32).clone(),
            "t": b["t"].detach().to("cpu", torch.float32).clone(),
            "identity": None if b.get("identity") is None else b["identity"].detach().to("cpu", torch.float32).clone(),
        })
    return {
        "format": FORMAT,
        "model": model,
        "width": float(width),
        "model_kwargs": {k: v for k, v in model_kwargs.items()},
        "blocks": clean,
        "summary": summarize(clean),
        "sha256": content_sha256(model, width, clean),
    }


def save_scales(payload: dict[str, Any], path: Path) -> Path:
    """Write ``payload`` (from :func:`build_scales`) to ``path`` with ``torch.save`` (parent folders
    created). Returns ``path``. Raises ``OSError`` when the file cannot be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def load_scales(path: str | Path) -> dict[str, Any]:
    """Read and verify a scales file (``torch.load(weights_only=True)``; the stored sha256 must match
    the content).

    Raises:
        ScalesError: missing file, not a scales file, or a content hash that does not match.
    """
    p = Path(path)
    if not p.is_file():
        raise ScalesError(f"scales file {p} does not exist")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of many types
        raise ScalesError(f"{p} is not a readable scales file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ScalesError(f"{p} is not a repsearch scales file (expected format {FORMAT})")
    sha = content_sha256(payload["model"], payload["width"], payload["blocks"])
    if sha != payload.get("sha256"):
        raise ScalesError(f"{p}: the content does not match its sha256 (the file was altered)")
    return payload


def check_compatible(payload: dict[str, Any], model_name: str, width: float, blocks: Optional[list] = None, where: str = "scales") -> None:
    """Check that the scales fit the model a recipe trains.

    Args:
        payload: from :func:`load_scales`.
        model_name, width: the recipe's ``model.name`` and ``model.width``.
        blocks: the model's ``blocks()`` (``BlockInfo`` list) and, when given, each block's path and
            identity flag must match too.

    Raises:
        ScalesError: another model, width, or block layout (one line naming both sides).
    """
    if payload["model"] != model_name or not math.isclose(float(payload["width"]), float(width)):
        raise ScalesError(
            f"{where} are for {payload['model']} width {payload['width']:g}, the recipe trains {model_name} width {float(width):g}"
        )
    if blocks is not None:
        got = [(b["path"], b["has_identity"]) for b in payload["blocks"]]
        want = [(b.path, b.has_identity) for b in blocks]
        if got != want:
            raise ScalesError(f"{where}: block layout differs from the model's ({len(got)} vs {len(want)} blocks)")
