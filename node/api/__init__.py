"""The node's HTTP API (FastAPI): one router per resource, collaborators injected.

:func:`create_app` builds the application; :mod:`node.api.deps` declares what a route may
ask for (the settings, a database session, the dispatcher, the model catalogue);
:mod:`node.api.schemas` every response body, so that ``/openapi.json`` documents them.
"""

from node.api.app import create_app

__all__ = ["create_app"]
