"""Synthetic paired echo + ECG studies with known ground truth (the echo phantom, DESIGN §8)."""

from echopulse.synth.ecg_sim import SimulatedECG, simulate_ecg
from echopulse.synth.phantom import Study, make_study, write_corpus, write_study_dicom, write_study_wfdb

__all__ = [
    "SimulatedECG",
    "Study",
    "make_study",
    "simulate_ecg",
    "write_corpus",
    "write_study_dicom",
    "write_study_wfdb",
]
