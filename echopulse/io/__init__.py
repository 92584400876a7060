"""Readers returning ``(array, metadata)``: multi-frame ultrasound DICOM, NIfTI/MetaImage cines and
ECG records."""

from echopulse.io.dicom_echo import EchoReadError, read_echo_dicom
from echopulse.io.ecg import ECGReadError, normalize_lead_name, read_ecg
from echopulse.io.volume import read_echo_volume

__all__ = ["ECGReadError", "EchoReadError", "normalize_lead_name", "read_ecg", "read_echo_dicom",
           "read_echo_volume"]
