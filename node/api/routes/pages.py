"""Pages for people: the landing page at ``/`` and the node's own static files.

Every page works without internet access (hospital networks often have none): HTML, CSS,
scripts and the chart library come from ``node/api/static/`` in the package, and a
Content-Security-Policy tells the browser to load nothing from any other host. The API
documentation (``/docs``, Swagger UI) is served from the files of the ``fastapi-offline``
package (see :func:`node.api.app.create_app`). No page holds data: the dashboard's script
fetches it with the reader's token.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from string import Template

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from node.api.deps import SettingsDep

#: The pages' HTML, CSS, scripts and vendored libraries (``/static/...``).
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
STATIC_URL = "/static"

#: Headers of the node's own pages: scripts, styles and requests from this node only.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(tags=["pages"], include_in_schema=False)


def static_files() -> StaticFiles:
    """The ASGI app that serves :data:`STATIC_DIR` (mounted at :data:`STATIC_URL`)."""
    return StaticFiles(directory=STATIC_DIR)


_LANDING = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title $version</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/site.css">
</head>
<body class="landing">
<main>
<h1><img src="/static/favicon.svg" alt="" width="36" height="36"> $title
 <span class="muted">$version</span></h1>
<p class="lead">Hospital AI node for ultrasound. Scanners send studies over DICOM
(AE title <code>$ae_title</code>, port <code>$dicom_port</code>); the node checks image
quality, runs its view and finding models and returns a DICOM Structured Report to the
PACS.</p>
<p class="notice"><strong>Not for clinical use</strong> with the bundled reference model
pack (<code>sononode-us-sim</code>): it is trained on <em>simulated</em> ultrasound images.
Which packs this node runs, and on which data they were trained, is listed by
<a href="/models">/models</a>.</p>
<ul class="links">
<li><a href="/dashboard">Dashboard</a><span>volume, drift and review, QC-fail and OOD rates
by vendor; exports and workers</span></li>
<li><a href="/docs">API documentation</a><span>Swagger UI; the
<a href="/openapi.json">OpenAPI document</a></span></li>
<li><a href="/health">/health</a><span>liveness</span></li>
<li><a href="/ready">/ready</a><span>readiness: database, broker, spool and a worker able
to analyse</span></li>
<li><a href="/metrics">/metrics</a><span>Prometheus metrics</span></li>
</ul>
<p class="muted">The dashboard, <code>/models</code> and <code>/metrics</code> need an API
token (<code>Authorization: Bearer &lt;token&gt;</code>; the dashboard asks for it);
<code>/health</code> and <code>/ready</code> do not.</p>
</main>
</body>
</html>
""")


@router.get("/", response_class=HTMLResponse)
def landing(request: Request, settings: SettingsDep) -> HTMLResponse:
    """The landing page: what this node is, and links to its pages (no data, no token)."""
    page = _LANDING.substitute(
        title=escape(request.app.title), version=escape(request.app.version),
        ae_title=escape(settings.ae_title), dicom_port=settings.dicom_port)
    return HTMLResponse(page, headers=PAGE_HEADERS)
