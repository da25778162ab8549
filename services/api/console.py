"""The web console: static files (services/api/ui/, vanilla JS and CSS, nothing fetched from the network)
served at /ui. It talks to the same /v1 API as any client, with the token it asks for."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).parent / "ui"


def mount_console(app: FastAPI) -> None:
    @app.get("/ui", include_in_schema=False)
    async def console_root():
        return RedirectResponse("/ui/", status_code=307)

    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="console")
