"""Models: video tokenizer (FSQ), ECG encoder, MaskGIT generator, masking schedules, sampling."""

from echopulse.models.checkpoint import load_checkpoint, save_checkpoint
from echopulse.models.ecg_encoder import ECGEncoder
from echopulse.models.generator import MaskGIT
from echopulse.models.quantizer import FSQ
from echopulse.models.sampling import sample
from echopulse.models.schedules import SCHEDULES, get_schedule
from echopulse.models.tokenizer import VideoTokenizer

__all__ = [
    "ECGEncoder",
    "FSQ",
    "MaskGIT",
    "SCHEDULES",
    "VideoTokenizer",
    "get_schedule",
    "load_checkpoint",
    "sample",
    "save_checkpoint",
]
