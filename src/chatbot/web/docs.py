"""`/docs` (Swagger UI) and `/redoc` (ReDoc) from files the service ships, not from a CDN.

FastAPI's own pages load their scripts from a CDN and are blank offline. The `fastapi-offline`
package ships Swagger UI's and ReDoc's browser builds; they are served from this origin under
`/docs/static/`, and each page gets a Content-Security-Policy that allows exactly what it needs:
Swagger UI's inline start-up script by its hash, inline styles, and `blob:` workers for ReDoc."""

import base64
import hashlib
import re
from importlib.resources import files

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

from chatbot.web.assets import Asset, AssetTable

_SHIPPED = files("fastapi_offline") / "static"
_JS = "text/javascript; charset=utf-8"

DOCS_ASSETS = AssetTable(
    "/docs/static",
    {
        "swagger-ui-bundle.js": Asset(_SHIPPED / "swagger-ui-bundle.js", _JS),
        "swagger-ui.css": Asset(_SHIPPED / "swagger-ui.css", "text/css; charset=utf-8"),
        "redoc.standalone.js": Asset(_SHIPPED / "redoc.standalone.js", _JS),
        "favicon.png": Asset(_SHIPPED / "favicon.png", "image/png"),
    },
)

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def docs_csp(html: str) -> str:
    """The policy of a docs page: its own origin, plus the inline scripts of this very page."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'self'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
        "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


def _page(page: HTMLResponse) -> HTMLResponse:
    html = bytes(page.body).decode()
    return HTMLResponse(
        html, headers={"Cache-Control": "no-cache", "Content-Security-Policy": docs_csp(html)}
    )


def docs_router(*, title: str, openapi_url: str) -> APIRouter:
    """The two viewers of the OpenAPI document at `openapi_url`, and the files they load."""
    router = APIRouter(include_in_schema=False)

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        prefix = root(request)
        return _page(
            get_swagger_ui_html(
                openapi_url=prefix + openapi_url,
                title=f"{title} - Swagger UI",
                swagger_js_url=prefix + DOCS_ASSETS.url("swagger-ui-bundle.js"),
                swagger_css_url=prefix + DOCS_ASSETS.url("swagger-ui.css"),
                swagger_favicon_url=prefix + DOCS_ASSETS.url("favicon.png"),
                oauth2_redirect_url=None,
                # The online validator's badge would be an image from swagger.io.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        prefix = root(request)
        return _page(
            get_redoc_html(
                openapi_url=prefix + openapi_url,
                title=f"{title} - ReDoc",
                redoc_js_url=prefix + DOCS_ASSETS.url("redoc.standalone.js"),
                redoc_favicon_url=prefix + DOCS_ASSETS.url("favicon.png"),
                with_google_fonts=False,
            )
        )

    @router.get("/docs/static/{name:path}")
    async def docs_asset(name: str, request: Request) -> Response:
        return await DOCS_ASSETS.respond(name, request)

    return router
