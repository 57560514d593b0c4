"""schemathesis against the API's own OpenAPI document: no 5xx, every body as declared.

Generated requests (paths, queries, bodies, with the admin token) go through the ASGI app
over a real index; a response must match its declared schema and no input may cause a
server error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from conftest import ADMIN
from fixtures import make_us_dataset
from hypothesis import HealthCheck, settings
from pydantic import SecretStr
from schemathesis.checks import negative_data_rejection
from test_scheduler import Recorder

from node import heartbeats
from node.api import create_app
from node.config import Settings
from node.db import Database, open_database
from node.index import InstanceMeta, register_instance

if TYPE_CHECKING:
    from fastapi import FastAPI
    from schemathesis.specs.openapi.schemas import OpenApiSchema


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    from harness.peers import get_port

    data = tmp_path_factory.mktemp("schema")
    configured = Settings(data_dir=data, dicom_port=get_port(), http_port=get_port(),
                          api_tokens=SecretStr(f"admin:{ADMIN['Authorization'].split()[1]}"))
    db: Database = open_database(configured.effective_database_url, configured.data_dir)
    ds = make_us_dataset(study_uid="1.2.840.99.30")
    register_instance(db, InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1"), path="a.dcm",
                      size_bytes=1, calling_ae_title="US1")
    with db.session() as session:  # a worker that can analyse: /ready answers 200
        heartbeats.beat(session, "schema:1", queues=["cpu", "gpu"], pool_pids=[],
                        can_analyse=True, device="cpu", packs=[], problem=None)
    return create_app(configured, db, dispatcher=Recorder().dispatcher())


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(app: FastAPI) -> OpenApiSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_own_contract(case: schemathesis.Case[Any]) -> None:
    # Every request carries the admin token (auth itself is tested in test_api.py), so a
    # "negative" case that only lacks the header would be judged wrongly; and FastAPI
    # ignores unknown query parameters by design. Every other check runs.
    case.call_and_validate(headers=ADMIN, excluded_checks=[negative_data_rejection])
