"""The web page at `/`: launch/static/index.html (one file, no external assets, so it works on an offline
cluster) with the server's sizes, defaults and whether it needs a key filled in.

The page holds no secret, so `/` needs no key; its own calls to /v1 send the key the user types.
"""
import base64
import hashlib
import json
import re
from pathlib import Path

from k4flash.geometry import MAX_TIME_LENGTH, RESOLUTIONS

PAGE = Path(__file__).with_name("static") / "index.html"
SLOT = "__K4FLASH_CONFIG__"  # inside <script type="application/json">: data, never run


def page_config(needs_key: bool, defaults: dict) -> dict:
    """What the page needs to offer only what the server takes: sizes as the API spells them ("WxH")."""
    sizes = [f"{width}x{height}" for height, width in RESOLUTIONS[512]]
    default_size = f"{defaults['width']}x{defaults['height']}"
    return {"sizes": sizes, "default_size": default_size if default_size in sizes else sizes[0],
            "default_seconds": min(max(int(defaults["time_length"]), 0), MAX_TIME_LENGTH),
            "max_seconds": MAX_TIME_LENGTH, "needs_key": bool(needs_key)}


def render(needs_key: bool, defaults: dict) -> str:
    text = PAGE.read_text(encoding="utf-8")
    assert text.count(SLOT) == 1, f"{PAGE} must hold {SLOT} once"
    # < > & as \u escapes: no "</script>" or "<!--" can end the JSON's element early, whatever a value holds.
    blob = json.dumps(page_config(needs_key, defaults)).replace("<", "\\u003c").replace(">", "\\u003e")
    return text.replace(SLOT, blob.replace("&", "\\u0026"))


def policy(page: str) -> str:
    """A Content-Security-Policy that lets only the page's own inline script run (by its hash) and lets it reach
    only this server: a browser refuses any external asset, and any injected script."""
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return ("default-src 'none'; " f"script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
            "media-src blob:; img-src blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_page(app, needs_key: bool, defaults: dict) -> None:
    """GET / : the page (no API key needed for the page itself; its calls send the key)."""
    from fastapi.responses import HTMLResponse

    page = render(needs_key, defaults)  # read once, at start-up: a missing file fails the server, not a request
    headers = {"Content-Security-Policy": policy(page), "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers=headers)
