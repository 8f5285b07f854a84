"""The files the service's own pages load (scripts, styles, icons), served from a fixed table.

A request names an entry of the table, never a path: nothing outside it can be reached, whatever
the URL holds. Each file is read once and answered from memory with a strong `ETag`; a URL that
carries the file's version (`?v=`, as the pages write it) may be cached for a year, any other
is revalidated. Text files are also kept gzipped for clients that accept it."""

import asyncio
import gzip
import hashlib
from dataclasses import dataclass
from functools import cached_property
from importlib.resources.abc import Traversable

from fastapi import Request, Response

from chatbot.errors import NotFound

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
_COMPRESSIBLE = ("text/", "application/json", "image/svg+xml")


class Asset:
    """One file and the type it is served as."""

    def __init__(self, source: Traversable, media_type: str) -> None:
        self.source = source
        self.media_type = media_type
        self._gzipped: bytes | None = None

    @cached_property
    def body(self) -> bytes:
        return self.source.read_bytes()

    @cached_property
    def version(self) -> str:
        """A digest of the content: it changes whenever the file does."""
        return hashlib.sha256(self.body).hexdigest()[:16]

    @property
    def compressible(self) -> bool:
        return self.media_type.startswith(_COMPRESSIBLE)

    async def gzipped(self) -> bytes:
        # Compressing the largest (Swagger UI, 1.5 MB) takes a while: not on the event loop.
        if self._gzipped is None:
            self._gzipped = await asyncio.to_thread(gzip.compress, self.body, 6, mtime=0)
        return self._gzipped


@dataclass(frozen=True)
class AssetTable:
    """The files served under `prefix`, by name (a name may contain `/`)."""

    prefix: str
    assets: dict[str, Asset]

    def url(self, name: str) -> str:
        """Where a page loads the file: its versioned URL, cached for good by browsers."""
        return f"{self.prefix}/{name}?v={self.assets[name].version}"

    async def respond(self, name: str, request: Request) -> Response:
        asset = self.assets.get(name)
        if asset is None:
            raise NotFound()
        versioned = request.query_params.get("v") == asset.version
        use_gzip = asset.compressible and _accepts_gzip(request.headers.get("accept-encoding"))
        etag = f'"{asset.version}-gzip"' if use_gzip else f'"{asset.version}"'
        headers = {
            "ETag": etag,
            "Cache-Control": IMMUTABLE if versioned else REVALIDATE,
            "Vary": "Accept-Encoding",
        }
        if _matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        if use_gzip:
            headers["Content-Encoding"] = "gzip"
            return Response(await asset.gzipped(), media_type=asset.media_type, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)


def _accepts_gzip(accept_encoding: str | None) -> bool:
    for part in (accept_encoding or "").lower().split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip() == "gzip":
            quality = params.strip().removeprefix("q=").strip()
            return quality == "" or _positive(quality)
    return False


def _positive(quality: str) -> bool:
    try:
        return float(quality) > 0
    except ValueError:
        return False


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags
