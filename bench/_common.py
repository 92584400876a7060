"""Helpers shared by the bench scripts and the tests (not a benchmark itself)."""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_random_tokens(out: str, recipe, n: int = 32, seed: int = 0, val_fraction: float = 0.25,
                        tokenizer_out: str | None = None) -> str:
    """A small ``tokens/v1`` dataset of random tokens and ECGs, plus the (untrained) tokenizer
    checkpoint it claims to come from: for benchmarks and tests that need a generator's input
    without training a tokenizer. Returns the tokenizer checkpoint directory.
    """
    import tempfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from echopulse import storage
    from echopulse.config import to_dict
    from echopulse.models.checkpoint import save_checkpoint
    from echopulse.models.tokenizer import VideoTokenizer
    from echopulse.schema import TOKENS_SCHEMA, write_dataset_info

    torch.manual_seed(seed)
    tokenizer_out = tokenizer_out or storage.join(out, "tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        tok_id = save_checkpoint(VideoTokenizer(recipe.tokenizer), recipe.tokenizer, tmp,
                                 kind="tokenizer", extra={"clip": to_dict(recipe.clip)})
        storage.upload_dir(tmp, tokenizer_out)
    rng = np.random.default_rng(seed)
    grid = tuple(recipe.tokenizer.token_grid)
    n_val = int(round(n * val_fraction))
    splits = ["val"] * n_val + ["train"] * (n - n_val)
    tokens = rng.integers(0, recipe.tokenizer.codebook_size, size=(n, *grid)).astype(np.int16)
    ecg = rng.standard_normal((n, 12, recipe.clip.ecg_samples)).astype(np.float32)
    table = pa.table({
        "clip_id": [f"random-{seed}-{i}" for i in range(n)],
        "tokens": pa.FixedShapeTensorArray.from_numpy_ndarray(tokens),
        "token_grid": [list(grid)] * n,
        "tokenizer_id": [tok_id] * n,
        "ecg": pa.FixedShapeTensorArray.from_numpy_ndarray(ecg),
        "view": ["A4C"] * n,
        "ef": rng.uniform(0.3, 0.7, n).astype(np.float32),
        "split": splits,
    })
    storage.makedirs(storage.join(out, "tokens"))
    fs, path = storage.filesystem(storage.join(out, "tokens", "part-0.parquet"))
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    counts = {"clips": n, "tokens": n, "quarantined": 0}
    write_dataset_info(out, TOKENS_SCHEMA, {"random": True, "seed": seed}, counts, tokenizer_id=tok_id,
                       token_grid=list(grid), codebook_size=recipe.tokenizer.codebook_size,
                       split_counts={"train": n - n_val, **({"val": n_val} if n_val else {})})
    return tokenizer_out


class CountingS3Server:
    """moto's S3 server (server mode, real HTTP on loopback) that records every request it serves.

    ``requests`` holds ``(method, kind, key)`` per request, ``kind`` one of ``list`` (a bucket
    listing), ``get``, ``head``, ``put``, ``post`` (multipart create/complete, bulk delete),
    ``delete``; :meth:`counts` tallies them. Used by ``bench/scale.py`` (S3 requests per input) and
    the S3 tests; ``endpoint`` is its URL (``AWS_ENDPOINT_URL_S3``).
    """

    def __init__(self) -> None:
        import logging
        import threading

        from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                                   create_backend_app)
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str, str]] = []

        def counting(environ, start_response):
            self.requests.append(self.classify(environ))
            return app(environ, start_response)

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a log line per request
        self._server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"

    @staticmethod
    def classify(environ) -> tuple[str, str, str]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        key = path.lstrip("/").partition("/")[2]
        if method == "GET" and not key and ("list-type" in query or "prefix" in query or not query):
            kind = "list"
        else:
            kind = method.lower()
        return method, kind, key

    def counts(self, since: int = 0) -> dict[str, int]:
        """Requests by kind from ``requests[since:]``."""
        import collections

        return dict(collections.Counter(kind for _, kind, _ in self.requests[since:]))

    def stop(self) -> None:
        self._server.shutdown()
