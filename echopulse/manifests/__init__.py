"""Manifests for public echo datasets in their published layouts (``echopulse manifest``).

One module per dataset (``mimic_echo``, ``echonet_dynamic``, ``echonet_pediatric``, ``camus``), each
with ``NAME`` and ``build(root, **options) -> Manifest``; ``registry`` maps names to them.
"""

from echopulse.manifests.common import MANIFEST_COLUMNS, SCREEN_ECG, LayoutError, Manifest, write_manifest
from echopulse.manifests.registry import DATASETS, build_manifest

__all__ = ["DATASETS", "MANIFEST_COLUMNS", "SCREEN_ECG", "LayoutError", "Manifest", "build_manifest",
           "write_manifest"]
