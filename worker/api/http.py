"""The FastAPI app: `POST /v1/cart/release`, `/openapi.json`, `/healthz`, `/readyz`, `/metrics`.

FastAPI does not parse the request: the body and headers are checked by the worker's own
rules (`service.ReleaseService`), so an HTTP client gets exactly the worker's codes. The
FastAPI route of the release declares the header parameters and the answers for the
OpenAPI document only; the requests are served by a plain Starlette route in front of it,
which skips FastAPI's per-request parameter solving (~100 µs a request, its result unused).
The request body's schema is the Kafka contract's `ReleaseRequest` model, added to the
document's components.

`POST /v1/cart/release` does not even go through Starlette's stack: the app (`_App`)
answers it itself, as a plain ASGI call, before the middleware (server errors, FastAPI's
telemetry and body limit, exception handlers, the exit stack) and the router, which cost
about a tenth of the api's CPU per request and do nothing for this route. Its answers are
the same bytes and headers; an unexpected error is still the page's 500, logged
`api_request_failed`. With tracing on (worker/tracing.py) every request takes the full
stack, whose FastAPI telemetry makes the HTTP server spans.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Protocol

import orjson
import structlog
from fastapi import FastAPI, Header, Request, Response
from fastapi.openapi.utils import get_openapi
from prometheus_client.exposition import choose_encoder
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from worker import tracing
from worker.api import metrics
from worker.api.models import ErrorBody, ReleaseResponse
from worker.api.service import HTTP_DESCRIPTIONS, HttpAnswer, error
from worker.contract import API_KEY_HEADER, SESSION_HEADER, TAG_HEADER, ReleaseRequest

TITLE = "cart-release-worker API"
VERSION = "1.0.0"
RELEASE_PATH = "/v1/cart/release"
# Required by the page; declared optional to FastAPI so that the worker's codes answer a
# missing one (401 missing_api_key, 400 missing_header), and marked required in the document.
REQUIRED_HEADERS = (API_KEY_HEADER, SESSION_HEADER, TAG_HEADER)

log = structlog.get_logger("worker.api")

DESCRIPTION = """\
The partner API page *POST Release Cart Items* served over HTTP on top of the Kafka
pipeline of cart-release-worker: each request becomes a record on the input topic, and
the answer is built from that record's results. The body is the Kafka input record's
value (`items` absent = release the whole cart). `Idempotency-Key` (1-128 characters)
becomes the event's `eventId`: a retry with the same key returns the same answer and
releases nothing twice, also after a 504.
"""

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": HTTP_DESCRIPTIONS[status]}
    for status in (400, 401, 403, 406, 422, 500, 503, 504)
}
_ERRORS[504]["description"] = (
    "Gateway timeout: `results_timeout` (no results within WORKER_API_TIMEOUT_S; the "
    "release is still applied, retry with the same Idempotency-Key), or the worker's "
    "`database_timeout`."
)


class Answerer(Protocol):
    """What answers a release request (`service.ReleaseService`)."""

    async def answer(self, request: Request) -> HttpAnswer: ...


_JSON = (b"content-type", b"application/json")


async def _send_json(send: Send, status: int, body: bytes) -> None:
    """What `Response(body, status, media_type="application/json")` sends, header for header."""
    headers = [(b"content-length", str(len(body)).encode("latin-1")), _JSON]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _App(FastAPI):
    """FastAPI, with `POST /v1/cart/release` answered before Starlette's stack (see above)."""

    fast_release: Callable[[Scope, Receive, Send], Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        release = self.fast_release
        if (
            release is not None
            and scope["type"] == "http"
            and scope["path"] == RELEASE_PATH
            and scope["method"] == "POST"
        ):
            await release(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(
    service: Answerer,
    alive: Callable[[], bool],
    ready: Callable[[], bool],
) -> FastAPI:
    app = _App(
        title=TITLE,
        version=VERSION,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
    )

    @app.post(
        RELEASE_PATH,
        summary="Release cart items",
        operation_id="releaseCartItems",
        response_model=ReleaseResponse,
        response_description="Every item's result, in request order (whole cart: "
        "reservation id order).",
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ReleaseRequest"}}
                },
            }
        },
    )
    async def release_cart_items(
        request: Request,
        rokt_api_key: Annotated[
            str | None, Header(alias=API_KEY_HEADER, description="The partner's API key.")
        ] = None,
        rokt_session_id: Annotated[
            str | None, Header(alias=SESSION_HEADER, description="Session id, at most 1 KiB.")
        ] = None,
        rokt_tag_id: Annotated[
            str | None,
            Header(alias=TAG_HEADER, description="Rokt tag id, one of the partner's tags."),
        ] = None,
        accept_language: Annotated[
            str | None, Header(alias="Accept-Language", description="Locale, at most 1 KiB.")
        ] = None,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description="1-128 characters; becomes the eventId (default: a new one).",
            ),
        ] = None,
    ) -> Response:
        return await release(request)

    async def release(request: Request) -> Response:
        answer = await service.answer(request)
        return Response(orjson.dumps(answer.body), answer.status, media_type="application/json")

    async def unexpected(request: Request, failure: Exception) -> Response:
        # Starlette's own answer is text/plain: a bug still answers in the page's schema.
        log.error("api_request_failed", exc_info=failure)
        return Response(_internal_error(), 500, media_type="application/json")

    app.add_exception_handler(Exception, unexpected)

    async def release_asgi(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            answer = await service.answer(Request(scope, receive, send))
            status, body = answer.status, orjson.dumps(answer.body)
        except Exception as failure:
            # As Starlette's ServerErrorMiddleware does with `unexpected`: answer, re-raise.
            log.error("api_request_failed", exc_info=failure)
            await _send_json(send, 500, _internal_error())
            raise
        await _send_json(send, status, body)

    if tracing.active() is None:
        app.fast_release = release_asgi

    # First match wins: POST requests reach `release` directly; the FastAPI route above
    # stays in app.routes for the OpenAPI document (which only reads APIRoutes).
    app.router.routes.insert(0, Route(RELEASE_PATH, release, methods=["POST"]))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return _probe(alive())

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        return _probe(ready())

    @app.get("/metrics", include_in_schema=False)
    async def metrics_page(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(metrics.REGISTRY), media_type=content_type)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
    return app


class _NoService:
    async def answer(self, request: Request) -> HttpAnswer:
        raise RuntimeError("this app only renders the OpenAPI document")


def openapi_document() -> dict[str, Any]:
    """The api's OpenAPI document, as `GET /openapi.json` serves it (and as committed in
    docs/contract/openapi.json), without any server."""
    return create_app(_NoService(), lambda: False, lambda: False).openapi()


def _internal_error() -> bytes:
    answer = error(500, "internal_error", "The request failed unexpectedly; retry it later.")
    return orjson.dumps(answer.body)


def _probe(ok: bool) -> Response:
    return Response(b"ok\n" if ok else b"not ok\n", 200 if ok else 503, media_type="text/plain")


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the request body's schema from the Kafka contract's model."""
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    body = ReleaseRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(body.pop("$defs", {}))
    schemas["ReleaseRequest"] = body
    for parameter in document["paths"][RELEASE_PATH]["post"]["parameters"]:
        if parameter["name"] in REQUIRED_HEADERS:
            parameter["required"] = True
            parameter["schema"] = {"type": "string"}
    return dict(sorted(document.items()))
