"""The chat page: plain HTML, CSS and JavaScript on the public API, no build step. Its script and
the libraries it uses (vendored in `vendor/`, see the README there) come from this origin only."""

import re
from importlib.resources import files

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from chatbot.web.assets import Asset, AssetTable

router = APIRouter(include_in_schema=False)

_HERE = files(__package__)
_JS = "text/javascript; charset=utf-8"

PAGE_ASSETS = AssetTable(
    "/static",
    {
        "chat.js": Asset(_HERE / "chat.js", _JS),
        "chat.css": Asset(_HERE / "chat.css", "text/css; charset=utf-8"),
        "favicon.svg": Asset(_HERE / "favicon.svg", "image/svg+xml"),
        "vendor/marked.umd.js": Asset(_HERE / "vendor" / "marked.umd.js", _JS),
        "vendor/purify.min.js": Asset(_HERE / "vendor" / "purify.min.js", _JS),
    },
)

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
"""Nothing inline and nothing from elsewhere: a reply's Markdown cannot run script or load an
image from another host (a tracking pixel), even if the sanitiser missed something."""


def _versioned(page: str) -> str:
    """The page with each `/static/...` reference pointing at that file's current version."""
    return re.sub(r'(?<=")/static/([^"?]+)(?=")', lambda match: PAGE_ASSETS.url(match[1]), page)


_PAGE = _versioned(_HERE.joinpath("index.html").read_text(encoding="utf-8"))


@router.get("/")
async def chat_page() -> HTMLResponse:
    return HTMLResponse(
        _PAGE,
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": PAGE_CSP,
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.get("/static/{name:path}")
async def page_asset(name: str, request: Request) -> Response:
    return await PAGE_ASSETS.respond(name, request)
