"""Rewrite phantom DICOMs the ways hospital archives store them: other transfer syntaxes, colour
photometrics, an embedded ECG Waveform Sequence. Used by the tests and the ingest benchmark.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

# names accepted by rewrite_transfer_syntax
TRANSFER_SYNTAXES = ("explicit", "implicit", "jpeg_baseline", "jpeg_ls", "jpeg2000", "rle")


def rewrite_transfer_syntax(src: str | Path, dst: str | Path, syntax: str, quality: int = 90) -> Path:
    """Write ``src`` (a native little-endian DICOM) to ``dst`` in another transfer syntax.

    JPEG-LS, JPEG 2000 and RLE use pydicom's encoders (pyjpegls, pylibjpeg-openjpeg, pydicom's RLE),
    all lossless. pydicom has no JPEG Baseline encoder, so those frames go through Pillow (8-bit,
    lossy, one fragment per frame) and are encapsulated.

    Args:
        src: a native (uncompressed) DICOM.
        dst: output path.
        syntax: one of ``TRANSFER_SYNTAXES``.
        quality: JPEG Baseline quality.
    """
    import pydicom
    from pydicom import uid

    ds = pydicom.dcmread(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if syntax == "explicit":
        ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        ds.save_as(dst, enforce_file_format=True, implicit_vr=False, little_endian=True)
    elif syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
        ds.save_as(dst, enforce_file_format=True, implicit_vr=True, little_endian=True)
    elif syntax == "jpeg_baseline":
        from PIL import Image

        frames = ds.pixel_array
        if int(ds.get("NumberOfFrames", 1)) == 1:
            frames = frames[None]
        color = int(ds.SamplesPerPixel) == 3
        fragments = []
        for frame in frames:
            buf = io.BytesIO()
            image = Image.fromarray(frame, "RGB" if color else "L")
            image.save(buf, format="JPEG", quality=quality, subsampling=1 if color else 0)
            fragments.append(buf.getvalue())
        ds.PixelData = pydicom.encaps.encapsulate(fragments)
        ds["PixelData"].VR = "OB"
        if color:
            ds.PhotometricInterpretation = "YBR_FULL_422"  # what a JFIF colour JPEG holds
        ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        ds.save_as(dst, enforce_file_format=True)
    else:
        target = {"jpeg_ls": uid.JPEGLSLossless, "jpeg2000": uid.JPEG2000Lossless,
                  "rle": uid.RLELossless}.get(syntax)
        if target is None:
            raise ValueError(f"unknown transfer syntax {syntax!r}; expected one of {TRANSFER_SYNTAXES}")
        ds.compress(target)
        ds.save_as(dst, enforce_file_format=True)
    return dst


def add_waveform(ds, signal: np.ndarray, fs: float, leads: list[str]) -> None:
    """Embed an ECG in ``ds`` as a Waveform Sequence (one multiplex group, 16-bit, 1 uV per count).

    Args:
        ds: a pydicom Dataset (an echo) to add the waveform to.
        signal: (n_leads, N) in mV.
        fs: sampling rate in Hz.
        leads: lead labels (written as the channel source's CodeMeaning).
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    counts = np.clip(np.round(np.asarray(signal, dtype=np.float64) * 1000.0), -32768, 32767).astype("<i2")
    channels = []
    for name in leads:
        source = Dataset()
        source.CodeValue, source.CodingSchemeDesignator, source.CodeMeaning = "2:1", "MDC", str(name)
        units = Dataset()
        units.CodeValue, units.CodingSchemeDesignator, units.CodeMeaning = "uV", "UCUM", "microvolt"
        ch = Dataset()
        ch.ChannelSourceSequence = Sequence([source])
        ch.ChannelSensitivity = 1.0
        ch.ChannelSensitivityUnitsSequence = Sequence([units])
        ch.ChannelSensitivityCorrectionFactor = 1.0
        ch.ChannelBaseline = 0.0
        ch.ChannelSampleSkew = 0.0
        ch.WaveformBitsStored = 16
        channels.append(ch)
    group = Dataset()
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = len(leads)
    group.NumberOfWaveformSamples = counts.shape[1]
    group.SamplingFrequency = float(fs)
    group.MultiplexGroupLabel = "ECG"
    group.ChannelDefinitionSequence = Sequence(channels)
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    group.WaveformData = counts.T.tobytes()  # interleaved: sample-major
    ds.WaveformSequence = Sequence([group])
