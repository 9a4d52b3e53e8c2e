"""The web page at ``/`` (``server/static/index.html``) and ``/static/*``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

PLACEHOLDER = """<!doctype html>
<html><head><meta charset="utf-8"><title>BitDance</title></head>
<body><h1>BitDance server</h1>
<p>The web page is not installed. The API is up: see <a href="/info">/info</a>,
<code>POST /generate</code> and <code>POST /v1/images/generations</code>.</p></body></html>
"""

router = APIRouter()


@router.get("/", include_in_schema=False, response_model=None)
async def index() -> Response:
    page = STATIC_DIR / "index.html"
    if page.is_file():
        return FileResponse(page, media_type="text/html")
    return HTMLResponse(PLACEHOLDER)
