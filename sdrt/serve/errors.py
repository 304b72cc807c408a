"""HTTP errors: every error is JSON ``{error, detail}``; bad input is 4xx, never 500, never a traceback."""

from __future__ import annotations

import logging

from sdrt.errors import ArtifactError, Cancelled, ImageInputError, InputError, ModelError, NumericsError, SdrtError

log = logging.getLogger(__name__)


class ApiError(SdrtError):
    """An HTTP error with its status: raised by handlers, rendered as ``{error, detail}``."""

    def __init__(self, status: int, detail: str, error: str | None = None, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}
        self.error = error or {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 410: "Gone",
                               413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "InvalidRequest",
                               429: "QueueFull", 503: "Unavailable"}.get(status, "Error")


def status_for(exc: BaseException) -> int:
    """The HTTP status of an sdrt error: input problems are 400, a cancelled job 409, the rest 5xx."""
    from sdrt.serve.jobs import Draining, QueueFull

    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, QueueFull):
        return 429
    if isinstance(exc, Draining):
        return 503
    if isinstance(exc, Cancelled):
        return 409
    if isinstance(exc, (InputError, ImageInputError)):
        return 400
    if isinstance(exc, (NumericsError, ArtifactError, ModelError)):
        return 500
    return 400


def body(error: str, detail: str) -> dict:
    return {"error": error, "detail": detail}


def install(app) -> None:
    """Exception handlers: ApiError / SdrtError / validation errors / unknown routes / anything else."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(body(exc.error, exc.detail), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(SdrtError)
    async def _sdrt_error(request, exc: SdrtError):
        status = status_for(exc)
        headers = {"Retry-After": "2"} if status in (429, 503) else None
        return JSONResponse(body(type(exc).__name__, str(exc)), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return JSONResponse(body("InvalidRequest", describe_validation(exc.errors())), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        error = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return JSONResponse(body(error, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(body("InternalError", f"internal error ({type(exc).__name__}); see the server log"),
                            status_code=500)


def describe_validation(errors) -> str:
    """pydantic's error list -> one line naming each field: 'steps: Input should be a valid integer'."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"
