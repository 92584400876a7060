"""``echopulse calibrate``: pick an existing generator checkpoint's guidance weight on a token
dataset's validation clips (what ``train generator`` does when it ends), e.g. for a checkpoint
trained before calibration existed or to re-pick on another archive's clips."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from echopulse import storage
from echopulse.errors import EchoPulseError

log = logging.getLogger(__name__)


def calibrate(checkpoint: str, tokens: str, overrides: dict[str, Any] | None = None, device: str | None = None,
              write: bool = True, allow_unsynchronized: bool = False):
    """Measure and (``write``) store the guidance calibration of ``checkpoint`` (a directory or
    URI) on ``tokens``' validation rows; returns the :class:`~echopulse.calibration.GuidanceCalibration`.

    Raises:
        EchoPulseError: not a generator checkpoint, tokens from another tokenizer, no usable rows,
            no candidates, or too few clips that move.
    """
    from echopulse.calibration import measure_checkpoint, write_calibration
    from echopulse.config import SamplingConfig, from_dict
    from echopulse.models.checkpoint import CONFIG_FILE, read_checkpoint_info
    from echopulse.schema import TOKENS_SCHEMA, read_dataset_info
    from jobs.datasets import validation_rows

    with tempfile.TemporaryDirectory() as tmp:
        local = storage.local_copy(checkpoint, tmp)
        try:
            meta = read_checkpoint_info(local)
        except ValueError as exc:
            raise EchoPulseError(f"{checkpoint}: {exc}") from None
        if meta["kind"] != "generator":
            raise EchoPulseError(f"{checkpoint} is a {meta['kind']} checkpoint; calibrate takes a generator")
        made_by = read_dataset_info(tokens, TOKENS_SCHEMA).get("tokenizer_id")
        if made_by != meta["extra"].get("tokenizer_id"):
            raise EchoPulseError(f"{tokens} was made by tokenizer {made_by}, but {checkpoint} was trained on "
                                 f"tokenizer {meta['extra'].get('tokenizer_id')}")
        sampling = from_dict(SamplingConfig, {**meta["extra"]["sampling"], **(overrides or {})})
        if not sampling.guidance_candidates:
            raise EchoPulseError("no guidance candidates to try")
        rows = validation_rows(tokens, sampling.calibration_clips, allow_unsynchronized)
        try:
            result = measure_checkpoint(local, rows, device, overrides)
        except ValueError as exc:
            raise EchoPulseError(f"{checkpoint}: {exc}") from None
        if write:
            write_calibration(local, result)
            if storage.is_remote(checkpoint):  # a local checkpoint was written in place
                with open(os.path.join(local, CONFIG_FILE), "rb") as f:
                    storage.write_bytes(storage.join(checkpoint, CONFIG_FILE), f.read())
    return result
