"""``echopulse serve``: a Ray Serve application over a generator checkpoint or registered model.

Ray Serve is the wiring only: request parsing and checks are :mod:`echopulse.serving`, generation
is :class:`echopulse.generate.EchoGenerator` (the code of ``echopulse generate``). Concurrent
requests meet in ``@serve.batch`` and share sampler forwards (:func:`echopulse.serving.generate_many`).

Routes: ``GET /health``; ``POST /generate`` with a multipart form (file field ``ecg``, twice for
a WFDB ``.hea`` + ``.dat`` pair; optional file ``first_frame``; option fields) or a JSON body
``{"ecg": [...], "rate": Hz, ...options}``; options may also be query parameters. The response is
the video (MP4, GIF or DICOM), or a JSON ``{"error": "one line"}`` with a 4xx status.

KubeRay: ``import_path: pipelines.serve:build_app`` with ``args`` (see cluster/kuberay/).
"""


# no `from __future__ import annotations`: FastAPI reads the route signatures at runtime
import asyncio
import email.parser
import email.policy
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from echopulse.serving import (
    DEFAULT_MAX_UPLOAD_MB,
    FORMATS,
    RequestError,
    build_request,
    check_size,
    encode_video,
    generate_many,
    parse_options,
    read_first_frame,
    read_json_ecg,
    read_uploaded_ecg,
)

log = logging.getLogger(__name__)

APP_NAME = "echopulse"


@dataclass(frozen=True)
class ServeConfig:
    """How the service runs (every field is a flag of ``echopulse serve``)."""

    checkpoint: str
    tracking_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_batch_size: int = 8
    batch_wait_s: float = 0.05
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB


api = FastAPI(title="EchoPulse", description="ECG in, echocardiogram video out.")


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, str], list[tuple[str, bytes]],
                                                        tuple[str, bytes] | None]:
    """(option fields, ECG files, first-frame file) of a multipart/form-data body, in memory."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise RequestError("malformed multipart body")
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    first = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise RequestError("a multipart part has no field name")
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if name == "ecg":
            files.append((filename or "ecg.csv", data))
        elif name == "first_frame":
            first = (filename or "first_frame.png", data)
        elif filename:
            raise RequestError(f"unexpected file field {name!r} (expected 'ecg' or 'first_frame')")
        else:
            fields[name] = data.decode("utf-8", errors="replace").strip()
    return fields, files, first


@serve.deployment(name="EchoGenerator")
@serve.ingress(api)
class EchoService:
    """One replica: a loaded generator, a batching queue, and the HTTP routes."""

    def __init__(self, config: dict[str, Any]) -> None:
        from echopulse.generate import EchoGenerator

        self.config = ServeConfig(**config)
        device = "cuda" if self.config.gpus_per_replica > 0 else None
        self.model = EchoGenerator.from_checkpoint(self.config.checkpoint, device=device,
                                                   tracking_uri=self.config.tracking_uri)
        self.max_bytes = int(self.config.max_upload_mb * 2**20)
        self.generate_batch.set_max_batch_size(self.config.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.config.batch_wait_s)
        self.batches = 0
        log.info("serving %s (model %s)", self.config.checkpoint, self.model.info.get("model_id"))

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "checkpoint": self.config.checkpoint,
                "model_id": self.model.info.get("model_id"), "frames": self.model.clip.frames,
                "fps": self.model.clip.fps, "size": self.model.size, "batches": self.batches}

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit():
            check_size(int(declared), self.max_bytes)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            check_size(size, self.max_bytes)  # a body without (or lying about) its length
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: Request):
        body = await self._body(request)
        content_type = request.headers.get("content-type", "")
        query = dict(request.query_params)
        if content_type.startswith("application/json"):
            prepared, options = await asyncio.to_thread(read_json_ecg, body)
            options = {**parse_options(query), **options} if query else options
            return build_request(prepared, options)
        if content_type.startswith("multipart/form-data"):
            try:
                fields, files, first = _multipart(content_type, body)
            except RequestError:
                raise
            except Exception as exc:  # whatever the parser trips on is still a bad body
                raise RequestError(f"malformed multipart body ({type(exc).__name__})") from None
            options = parse_options({**query, **fields})
            prepared = await asyncio.to_thread(read_uploaded_ecg, files, options.get("rate"))
            frame = None
            if first is not None:
                frame = await asyncio.to_thread(read_first_frame, first[0], first[1], self.model.size)
            return build_request(prepared, options, frame)
        raise RequestError(f"unsupported content type {content_type or '(none)'!r}: send "
                           "multipart/form-data (file field 'ecg') or application/json", status=415)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, requests: list) -> list:
        self.batches += 1
        return await asyncio.to_thread(generate_many, self.model, requests)

    @api.post("/generate")
    async def generate(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            parsed = await self._parse(request)
            result = await self.generate_batch(parsed)
            if isinstance(result, RequestError):
                raise result
            fps = parsed.fps or self.model.clip.fps
            data = await asyncio.to_thread(encode_video, result, fps, parsed)
        except RequestError as exc:
            log.info("rejected: %s", exc)
            return _error(exc)
        return Response(data, media_type=FORMATS[parsed.format], headers={
            "X-EchoPulse-Frames": str(len(result)), "X-EchoPulse-Fps": f"{fps:g}",
            "X-EchoPulse-Seconds": f"{time.perf_counter() - started:.3f}",
            "Content-Disposition": f'attachment; filename="echo.{parsed.format}"'})


def build_app(args: dict[str, Any]):
    """The application (also KubeRay's ``import_path: pipelines.serve:build_app``)."""
    fields = ServeConfig.__dataclass_fields__
    unknown = sorted(set(args) - set(fields) - {"revision"})  # revision: only forces a redeploy
    if unknown:
        raise ValueError(f"unknown serve args {unknown}; known: {sorted(fields)}")
    config = ServeConfig(**{k: v for k, v in args.items() if k in fields})
    if config.max_batch_size < 1 or config.replicas < 1:
        raise ValueError("max_batch_size and replicas must be at least 1")
    deployment = EchoService.options(
        num_replicas=config.replicas,
        max_ongoing_requests=max(2 * config.max_batch_size, 4),
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
    )
    return deployment.bind(asdict(config))


def start(config: ServeConfig, blocking: bool = True, on_ready=None) -> str:
    """Start (or join, with ``RAY_ADDRESS``) Ray, deploy the app, and serve until interrupted.

    Returns:
        The base URL (when not ``blocking``).
    """
    from echopulse.runtime import init_ray

    init_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(asdict(config)), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{config.host}:{config.port}"
    log.info("serving on %s (POST /generate, GET /health)", url)
    if not blocking:
        return url
    if on_ready is not None:  # the CLI tells its user where to send requests
        on_ready(url)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
    return url
