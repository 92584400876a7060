"""The one checkpoint format: a directory with ``model.safetensors`` and ``config.json``.

``config.json`` holds ``{"kind", "format_version", "config", "model_id", "extra"}``; the model config
is enough to rebuild the model, so loading needs nothing else. Weights are safetensors (never
pickle). ``model_id`` is the first 16 hex digits of the sha256 of ``model.safetensors``: it names
the exact weights (the tokens/v1 ``tokenizer_id``) and is checked on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from echopulse.config import GeneratorConfig, TokenizerConfig, from_dict, to_dict
from echopulse.models.generator import MaskGIT
from echopulse.models.tokenizer import VideoTokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
KINDS: dict[str, tuple[type, type[nn.Module]]] = {
    "tokenizer": (TokenizerConfig, VideoTokenizer),
    "generator": (GeneratorConfig, MaskGIT),
}


def _sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP / ``torch.compile`` wrapper (or the model itself)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_checkpoint(
    model: nn.Module,
    cfg: TokenizerConfig | GeneratorConfig,
    path: str | os.PathLike,
    kind: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write ``model`` and ``cfg`` as a checkpoint directory.

    Args:
        model: a :class:`VideoTokenizer` or :class:`MaskGIT` (a DDP/compiled wrapper is unwrapped).
        cfg: the config the model was built from.
        path: local directory (created if needed; existing files are overwritten).
        kind: ``"tokenizer"`` or ``"generator"``.
        extra: JSON-able metadata (step, metrics, data version, ...).

    Returns:
        The model id: first 16 hex digits of the sha256 of ``model.safetensors``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {sorted(KINDS)}")
    cfg_cls, model_cls = KINDS[kind]
    model = unwrap(model)
    if not isinstance(cfg, cfg_cls) or not isinstance(model, model_cls):
        raise ValueError(
            f"a {kind} checkpoint needs a {model_cls.__name__} and a {cfg_cls.__name__}, "
            f"got {type(model).__name__} and {type(cfg).__name__}"
        )
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    # no safetensors metadata: its map is written in arbitrary key order, which would make the bytes
    # (and so model_id) differ between saves of the same weights; config.json carries it instead
    save_file(tensors, str(tmp))
    os.replace(tmp, weights)  # a reader never sees half a file
    model_id = _sha256_prefix(weights)
    meta = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "config": to_dict(cfg),
        "extra": extra or {},
    }
    _write_meta(directory, meta)
    logger.info("saved %s checkpoint %s to %s", kind, model_id, directory)
    return model_id


def update_extra(path: str | os.PathLike, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into a checkpoint directory's ``extra`` metadata (atomically: a reader
    sees the old ``config.json`` or the new one); the weights and ``model_id`` are untouched.
    Returns the new ``extra``."""
    directory = Path(path)
    meta = read_checkpoint_info(directory)
    meta["extra"] = {**meta.get("extra", {}), **updates}
    _write_meta(directory, meta)
    return meta["extra"]


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """``config.json`` written whole or not at all (a temporary file renamed over it)."""
    tmp_cfg = directory / (CONFIG_FILE + ".tmp")
    tmp_cfg.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_cfg, directory / CONFIG_FILE)


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, validated (no weights loaded)."""
    directory = Path(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"not a checkpoint: {config_path} is missing")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"not a checkpoint: {config_path} is not valid JSON ({e})") from None
    for key in ("kind", "format_version", "config"):
        if key not in meta:
            raise ValueError(f"not a checkpoint: {config_path} has no {key!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format_version {meta['format_version']} is not supported (expected {FORMAT_VERSION})"
        )
    if meta["kind"] not in KINDS:
        raise ValueError(f"checkpoint kind {meta['kind']!r} is unknown; known: {sorted(KINDS)}")
    return meta


def load_checkpoint(
    path: str | os.PathLike,
    expected_kind: str | None = None,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> tuple[nn.Module, TokenizerConfig | GeneratorConfig, dict[str, Any]]:
    """Rebuild a model from a checkpoint directory.

    Args:
        path: local checkpoint directory.
        expected_kind: ``"tokenizer"`` / ``"generator"`` to refuse the other kind.
        map_location: device the weights are loaded to.
        verify: recompute the sha256 of the weights and compare it to ``model_id``.

    Returns:
        ``(model in eval mode, cfg, info)`` with info keys ``kind``, ``model_id``, ``format_version``,
        ``extra``, ``path``.

    Raises:
        ValueError: missing files, wrong kind, corrupted weights, or weights that do not match the config.
    """
    directory = Path(path)
    meta = read_checkpoint_info(directory)
    kind = meta["kind"]
    if expected_kind is not None and kind != expected_kind:
        raise ValueError(f"checkpoint is a {kind}, expected a {expected_kind}: {directory}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"not a checkpoint: {weights} is missing")
    model_id = meta.get("model_id")
    if verify and model_id is not None:
        actual = _sha256_prefix(weights)
        if actual != model_id:
            raise ValueError(f"checkpoint weights sha256 {actual} does not match model_id {model_id}: {weights}")

    cfg_cls, model_cls = KINDS[kind]
    cfg = from_dict(cfg_cls, _upgrade_config(kind, meta["config"]))
    model = model_cls(cfg)
    state = load_file(str(weights), device=str(map_location))
    _check_state(model.state_dict(), state, kind)
    model.load_state_dict(state)
    model.to(map_location).eval()
    info = {
        "kind": kind,
        "model_id": model_id,
        "format_version": meta["format_version"],
        "extra": meta.get("extra", {}),
        "path": str(directory),
    }
    return model, cfg, info


def _upgrade_config(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with the values older versions built with but did not write.

    Tokenizers saved before ``TokenizerConfig.patch_input`` existed normalised their pixel patches
    (today's default does not), so a tokenizer config without the field loads as ``"normed"``.
    """
    if kind == "tokenizer" and "patch_input" not in config:
        return {**config, "patch_input": "normed"}
    return config


def _check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], kind: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name in sorted(set(expected) & set(found)):
        if tuple(expected[name].shape) != tuple(found[name].shape):
            problems.append(
                f"tensor {name}: expected {tuple(expected[name].shape)}, checkpoint has {tuple(found[name].shape)}"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{kind} weights do not match its config: {shown}")
