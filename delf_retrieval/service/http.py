"""Web service over a :class:`.recognizer.Recognizer`: JSON API, health, docs, one HTML page.

Endpoints (``create_app``)::

    GET  /                        the page: choose a photo, see the landmark and its neighbours
    POST /predict                 a photo (multipart field ``file``, or an image/* body) -> prediction JSON
    GET  /health                  {"status": "ok", index facts}
    GET  /thumbnails/{image_id}   a train photo's thumbnail from the index (JPEG)
    GET  /docs, /openapi.json     OpenAPI documentation (FastAPI)

Bad input gets a 4xx answer ``{"detail": "..."}`` and the server goes on: 400 empty or
not an image, 413 over ``max_upload_bytes``, 415 another content type, 422 a form without
``file``, or a photo outside the input rules (under 16 px a side, or a non-JPEG over
``max_image_pixels``, both stated by ``/health``). Predictions run in worker threads, at most ``concurrency`` at once, on one
read-only recognizer; :func:`serve` bounds each library's threads first
(:func:`.threads.limit_threads`) so concurrent requests do not oversubscribe the cores.

Needs the ``serve`` extra: ``pip install "delf_retrieval[serve]"``.
"""


import functools
import os
import socket
from dataclasses import dataclass
from importlib import resources
from typing import Any

from delf_retrieval.core.threads import available_cores, limit_threads
from delf_retrieval.features.images import (
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    ImageDecodeError,
    ImageRejectedError,
)
from delf_retrieval.service.recognizer import Recognizer

ACCEPTED_TYPES = ("image/", "application/octet-stream")
# Room for the multipart envelope around the photo when checking Content-Length.
_MULTIPART_OVERHEAD = 64 * 1024
_PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the web service.

    Attributes
    ----------
    max_upload_bytes : photos larger than this are refused (413).
    concurrency : predictions running at once; more requests wait their turn.
    threads : threads per prediction (OpenCV, BLAS, TensorFlow, RANSAC workers).
    """

    max_upload_bytes: int = 20 * 1024 * 1024
    concurrency: int = 2
    threads: int = 1

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1 or self.concurrency < 1 or self.threads < 1:
            raise ValueError(f"serve settings must be positive, got {self}")

    @classmethod
    def for_cores(cls, cores: int | None = None, **changes: Any) -> "ServeSettings":
        """One prediction per core, one thread each (the default of ``serve``)."""
        cores = available_cores() if cores is None else cores
        values = {"concurrency": cores, "threads": 1, **changes}
        return cls(**values)


def _fastapi():
    try:
        import fastapi
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError('the web service needs the serve extra: pip install "delf_retrieval[serve]"') from error
    return fastapi


def page_html() -> str:
    """The single HTML page (``delf_retrieval/web/index.html``)."""
    return resources.files("delf_retrieval").joinpath("web/index.html").read_text(encoding="utf-8")


def create_app(recognizer: Recognizer, settings: ServeSettings | None = None):
    """The FastAPI application answering with ``recognizer`` (shared, read-only)."""
    fastapi = _fastapi()
    import anyio  # comes with FastAPI (extra [serve])
    from fastapi import HTTPException, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    settings = settings or ServeSettings()
    app = fastapi.FastAPI(
        title="delf_retrieval landmark recognition",
        description=(
            "POST a photo to /predict; the answer is the landmark, its confidence (the probability that it is "
            "right when the index has a confidence model: `probability`, `verdict` \"landmark, 87%\"), and the "
            "matched train photos."
        ),
        version="1",
    )
    limiter = anyio.CapacityLimiter(settings.concurrency)
    page = page_html()
    app.state.recognizer = recognizer
    app.state.settings = settings

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit():
            if int(length) > settings.max_upload_bytes + _MULTIPART_OVERHEAD:
                return JSONResponse({"detail": _too_large(settings)}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> str:
        return page

    @app.get("/health", summary="Is the service up, and what index does it serve")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            **recognizer.info(),
            "concurrency": settings.concurrency,
            "threads_per_request": settings.threads,
            "max_upload_bytes": settings.max_upload_bytes,
            # What one photo may be: larger JPEGs are decoded reduced, other formats refused (422).
            "max_image_pixels": MAX_IMAGE_PIXELS,
            "min_image_side": MIN_IMAGE_SIDE,
        }

    @app.post("/predict", summary="Recognise the landmark in one photo", openapi_extra={"requestBody": _PREDICT_BODY})
    async def predict(request: Request) -> dict[str, Any]:
        data = await _read_photo(request, settings)
        try:
            prediction = await anyio.to_thread.run_sync(functools.partial(recognizer.predict, data), limiter=limiter)
        except ImageRejectedError as error:  # readable, but outside the input rules every path applies
            raise HTTPException(422, f"photo refused: {error}") from None
        except ImageDecodeError as error:
            raise HTTPException(400, f"not a readable image: {error}") from None
        return prediction.to_dict()

    @app.get("/thumbnails/{image_id}", summary="Thumbnail of a train photo", response_class=FileResponse)
    async def thumbnail(image_id: str):
        path = recognizer.thumbnail_path(image_id)
        if path is None:
            raise HTTPException(404, f"no thumbnail for train photo {image_id!r}")
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    return app


async def _read_photo(request, settings: ServeSettings) -> bytes:
    """The photo's bytes from a multipart form (field ``file``) or a raw image/* body."""
    from fastapi import HTTPException

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "the form has no file field named 'file'")
        part_type = (upload.content_type or "application/octet-stream").lower()
        if not part_type.startswith(ACCEPTED_TYPES):
            raise HTTPException(415, f"the file is {part_type}; send a photo (image/jpeg, image/png, ...)")
        data = await upload.read(settings.max_upload_bytes + 1)
    elif content_type.startswith(ACCEPTED_TYPES):
        data = bytearray()
        async for chunk in request.stream():
            data.extend(chunk)
            if len(data) > settings.max_upload_bytes:
                break
        data = bytes(data)
    else:
        raise HTTPException(
            415,
            f"content type {content_type or 'missing'!s}: send the photo as multipart/form-data "
            "(field 'file') or as an image/* body",
        )
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, _too_large(settings))
    if not data:
        raise HTTPException(400, "empty file: the photo has 0 bytes")
    return data


def _too_large(settings: ServeSettings) -> str:
    return f"photo too large: the limit is {settings.max_upload_bytes} bytes ({settings.max_upload_bytes / 2**20:.1f} MiB)"


def check_port(host: str, port: int) -> None:
    """Raise ValueError unless this process can listen on ``host:port`` now (a port out of
    range, one in use, an address not of this machine), as uvicorn will bind it."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port/--host") from None


def serve(
    index_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    log_level: str = "info",
) -> None:
    """Bound the threads, load the index and serve it with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError('the web service needs the serve extra: pip install "delf_retrieval[serve]"') from error
    settings = settings or ServeSettings.for_cores()
    check_port(host, port)  # before the index loads: a port in use is a user error, said in one line
    limits = limit_threads(settings.threads)
    recognizer = Recognizer.load(index_dir, WORKERS=settings.threads)
    print(
        f"{recognizer!r} loaded in {recognizer.load_seconds:.2f} s; {settings.concurrency} predictions at once, "
        f"{settings.threads} thread(s) each ({', '.join(f'{k} {v}' for k, v in limits.items())})",
        flush=True,
    )
    print(f"page: http://{host}:{port}/   API docs: http://{host}:{port}/docs", flush=True)
    uvicorn.run(create_app(recognizer, settings), host=host, port=port, log_level=log_level)
