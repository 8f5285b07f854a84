"""The files the chat page and the API docs load: served from the service's own origin out of a
fixed table, with their types and caching headers; no other file is reachable through those
routes, whatever the path holds; and the vendored libraries are the versions their README names."""

import asyncio
import base64
import hashlib
import re
from typing import Any

import pytest

from tests.support import ROOT, Service

VENDOR = ROOT / "src" / "chatbot" / "web" / "vendor"
FILES = {
    "/static/chat.js": "text/javascript; charset=utf-8",
    "/static/chat.css": "text/css; charset=utf-8",
    "/static/favicon.svg": "image/svg+xml",
    "/static/vendor/marked.umd.js": "text/javascript; charset=utf-8",
    "/static/vendor/purify.min.js": "text/javascript; charset=utf-8",
    "/docs/static/swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "/docs/static/swagger-ui.css": "text/css; charset=utf-8",
    "/docs/static/redoc.standalone.js": "text/javascript; charset=utf-8",
    "/docs/static/favicon.png": "image/png",
}
NOT_SERVED = [
    "/static/nothing.js",
    "/static/",
    "/static/chat.js/",
    "/static/CHAT.JS",
    "/static/index.html",
    "/static/router.py",
    "/static/vendor/README.md",
    "/static/vendor/package.json",
    "/static/vendor/marked.LICENSE.md",
    "/static/../app.py",
    "/static/vendor/../chat.js",
    "/static/%2e%2e/app.py",
    "/static/..%2F..%2Fconfig.py",
    "/static/vendor/..%5C..%5Capp.py",
    "/static//etc/passwd",
    "/static/%2Fetc%2Fpasswd",
    "/static/chat.js%00.png",
    "/docs/static/../../fastapi_offline/core.py",
    "/docs/static/%2e%2e/core.py",
    "/docs/static/chat.js",
    "/static/swagger-ui-bundle.js",
]


def _version(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


@pytest.mark.parametrize("path", list(FILES))
async def test_each_file_is_served_with_its_type_and_validators(
    service: Service, path: str
) -> None:
    plain = await service.client.get(path, headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200
    assert plain.headers["content-type"] == FILES[path]
    assert plain.headers["x-content-type-options"] == "nosniff"
    assert "content-encoding" not in plain.headers
    etag = plain.headers["etag"]
    assert etag == f'"{_version(plain.content)}"'
    # Without its version in the URL a browser must ask again; with it, it may keep it.
    assert plain.headers["cache-control"] == "no-cache"
    versioned = await service.client.get(path, params={"v": _version(plain.content)})
    assert versioned.headers["cache-control"] == "public, max-age=31536000, immutable"
    stale = await service.client.get(path, params={"v": "0" * 16})
    assert stale.headers["cache-control"] == "no-cache"

    again = await service.client.get(
        path, headers={"Accept-Encoding": "identity", "If-None-Match": etag}
    )
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag

    if plain.headers["content-type"].startswith("image/png"):
        return
    zipped = await service.client.get(path, headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["vary"] == "Accept-Encoding"
    assert zipped.headers["etag"] != etag
    assert zipped.content == plain.content  # httpx has decoded it
    assert int(zipped.headers["content-length"]) < len(plain.content)
    refused = await service.client.get(path, headers={"Accept-Encoding": "gzip;q=0"})
    assert "content-encoding" not in refused.headers


async def _raw_get(service: Service, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written: no client between normalises its dots or escapes."""
    port = int(service.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_no_other_file_is_reachable_through_the_file_routes(service: Service) -> None:
    for target in NOT_SERVED:
        status, body = await _raw_get(service, target)
        assert status == 404, target
        assert b'"code":"not_found"' in body.replace(b" ", b""), target
    # The same routes do serve their files, so the 404s above are not an accident of the client.
    status, _ = await _raw_get(service, "/static/chat.js")
    assert status == 200


def _references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', html)


async def test_the_chat_page_loads_only_versioned_files_of_its_own_origin(
    service: Service,
) -> None:
    page = await service.client.get("/")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy
    assert "style-src 'self';" in policy
    assert "unsafe-inline" not in policy
    assert "unsafe-eval" not in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["cache-control"] == "no-cache"
    assert "<script>" not in page.text
    assert "style=" not in page.text
    references = _references(page.text)
    assert sorted(reference.split("?")[0] for reference in references) == [
        "/static/chat.css",
        "/static/chat.js",
        "/static/favicon.svg",
        "/static/vendor/marked.umd.js",
        "/static/vendor/purify.min.js",
    ]
    for reference in references:
        response = await service.client.get(reference)
        assert response.status_code == 200, reference
        assert reference.endswith(f"?v={_version(response.content)}")
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"


def _inline_script_hashes(html: str) -> set[str]:
    return {
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    }


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_the_docs_load_their_files_from_here_under_a_policy_of_their_own(
    service: Service, path: str
) -> None:
    page = await service.client.get(path)
    assert page.status_code == 200
    assert "cdn." not in page.text
    assert "fonts.googleapis" not in page.text
    references = _references(page.text)
    assert references
    for reference in references:
        assert re.fullmatch(r"/docs/static/[\w.-]+\?v=[0-9a-f]{16}", reference), reference
        assert (await service.client.get(reference)).status_code == 200, reference
    policy = page.headers["content-security-policy"]
    script_src = next(part for part in policy.split("; ") if part.startswith("script-src"))
    # Its own inline start-up script (Swagger UI has one, ReDoc none) by hash, nothing else.
    assert set(script_src.split()[2:]) == _inline_script_hashes(page.text)
    assert "unsafe" not in script_src
    assert "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy


async def test_without_docs_neither_the_viewers_nor_their_files_are_served(
    start_service: Any,
) -> None:
    async with start_service(docs=False) as service:
        for path in ["/docs", "/redoc", "/openapi.json", "/docs/static/swagger-ui-bundle.js"]:
            assert (await service.client.get(path)).status_code == 404, path
        assert (await service.client.get("/static/chat.js")).status_code == 200


def _readme_row(name: str) -> list[str]:
    readme = (VENDOR / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.mark.parametrize(
    ("name", "package", "banner"),
    [
        ("marked.umd.js", "marked", r"marked v(\S+) - a markdown parser"),
        ("purify.min.js", "dompurify", r"@license DOMPurify (\S+) "),
    ],
)
def test_the_vendored_files_are_the_versions_the_readme_and_lockfile_name(
    name: str, package: str, banner: str
) -> None:
    body = (VENDOR / name).read_bytes()
    _, _, version, _, digest = _readme_row(name)
    assert digest.strip("`") == hashlib.sha256(body).hexdigest()
    match = re.search(banner, body[:400].decode())
    assert match is not None
    assert match[1] == version
    lock = (VENDOR / "package-lock.json").read_text()
    assert f'"node_modules/{package}": {{\n      "version": "{version}"' in lock
    assert f'"{package}": "{version}"' in (VENDOR / "package.json").read_text()
    assert not (VENDOR / "node_modules").exists()
