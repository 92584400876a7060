"""WFDB reading: ``read_ecg`` through the fast format-16 reader against ``wfdb.rdrecord``, one run.

Writes ``--records`` 12-lead records (``--seconds`` at 500 Hz, format 16, as MIMIC-IV-ECG and PTB-XL
store them) with ``wfdb.wrsamp`` and times ``echopulse.io.ecg.read_ecg`` on each, alternating the
two paths record by record so machine load falls on both alike.

    python bench/wfdb_read.py --json out.json

JSON: ``{"fast_ms", "wfdb_ms", "speedup", "records", "seconds", "machine"}`` (medians per record).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200, help="(default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="record length (default: %(default)s)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)

    import wfdb

    from echopulse.io import ecg as ecg_io
    from echopulse.io import wfdb_fast

    fast_reader = wfdb_fast.read_format16
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"fast": [], "wfdb": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.records):
            signal = np.cumsum(rng.normal(0, 0.02, (int(500 * args.seconds), 12)), axis=0)
            wfdb.wrsamp(f"r{i:05d}", fs=500, units=["mV"] * 12, sig_name=LEADS, p_signal=signal,
                        fmt=["16"] * 12, write_dir=tmp)
        for i in range(args.records):
            header = os.path.join(tmp, f"r{i:05d}.hea")
            order = ("fast", "wfdb") if i % 2 else ("wfdb", "fast")
            for path in order:
                wfdb_fast.read_format16 = fast_reader if path == "fast" else (lambda record: None)
                t = time.perf_counter()
                ecg_io.read_ecg(header)
                times[path].append(time.perf_counter() - t)
        wfdb_fast.read_format16 = fast_reader
    fast_ms, wfdb_ms = (float(np.median(times[k]) * 1000) for k in ("fast", "wfdb"))
    result = {"fast_ms": round(fast_ms, 3), "wfdb_ms": round(wfdb_ms, 3), "speedup": round(wfdb_ms / fast_ms, 2),
              "records": args.records, "seconds": args.seconds,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_avg": [round(x, 2) for x in os.getloadavg()]}}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
