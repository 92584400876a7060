"""Dataset name -> layout module; :func:`build_manifest` is what ``echopulse manifest`` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from echopulse.manifests import camus, echonet_dynamic, echonet_pediatric, mimic_echo
from echopulse.manifests.common import LayoutError, Manifest

DATASETS = {m.NAME: m for m in (mimic_echo, echonet_dynamic, echonet_pediatric, camus)}


def build_manifest(dataset: str, root: str | Path, **options: Any) -> Manifest:
    """Manifest rows for the public dataset ``dataset`` stored at ``root``.

    Args:
        dataset: one of ``DATASETS`` (mimic-echo, echonet-dynamic, echonet-pediatric, camus).
        root: the dataset's root folder, in the layout its module describes.
        **options: layout options: ``ecg_root``/``max_gap`` (mimic-echo), ``fps`` (camus).

    Raises:
        LayoutError: unknown dataset, a root that is not a folder or not in the named layout.
    """
    if dataset not in DATASETS:
        raise LayoutError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    root = Path(root).resolve()
    if not root.is_dir():
        raise LayoutError(f"{root}: not a folder (the {dataset} root)")
    manifest = DATASETS[dataset].build(root, **options)
    if not manifest.rows:
        skipped = ", ".join(f"{n} {why}" for why, n in manifest.skipped.items()) or "nothing listed"
        raise LayoutError(f"{root}: no usable echo in this {dataset} root ({skipped})")
    return manifest
