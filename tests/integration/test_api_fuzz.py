"""Schemathesis against the live api on the embedded stack (with the real worker behind it):
whatever it generates, positive or negative, the answer is documented in the OpenAPI
document (status, content type, body schema), and no answer is a 5xx other than a
documented 504."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import World
from tests.integration.test_api import api_client
from tests.support import running_worker
from worker.api.http import RELEASE_PATH, openapi_document

pytestmark = [
    pytest.mark.integration,
    # schemathesis 4.32's strategies use `random` inside hypothesis (its issue, not ours).
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

EXAMPLES = 30  # per generation mode: generating a case takes most of the ~0.2 s each
DOCUMENTED_5XX = {(504, "results_timeout"), (504, "database_timeout")}


def fuzz(base_url: str, mode: schemathesis.GenerationMode, credentials: dict[str, str]) -> int:
    """Run the generated requests (blocking); return how many reached a 200."""
    operation = schemathesis.openapi.from_dict(openapi_document())[RELEASE_PATH]["POST"]
    answered_200 = examples = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case[Any]) -> None:
        nonlocal answered_200
        nonlocal examples
        examples += 1
        # In positive mode every other case carries the partner's real credentials, so
        # that valid requests reach the worker (the others mostly end as 401 here).
        real = mode is schemathesis.GenerationMode.POSITIVE and examples % 2
        response = case.call(base_url=base_url, headers=credentials if real else None, timeout=30)
        case.validate_response(
            response,
            checks=[
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
                response_headers_conformance,
            ],
        )
        if response.status_code >= 500:
            code = response.json()["errors"][0]["code"]
            assert (response.status_code, code) in DOCUMENTED_5XX, response.text
        answered_200 += response.status_code == 200

    check()
    return answered_200


async def test_schemathesis_finds_no_undocumented_answer_and_no_server_error(
    world: World,
) -> None:
    credentials: dict[str, Any] = {"rokt-api-key": world.api_key, "rokt-tag-id": "tag-1"}
    async with running_worker(world.settings), api_client(world.settings) as client:
        base_url = str(client.base_url)
        # The api and the worker run on this loop; the blocking client in a thread.
        answered = {
            mode: await asyncio.to_thread(fuzz, base_url, mode, credentials)
            for mode in schemathesis.GenerationMode
        }
    # Valid requests went through the worker and back (not all stopped at the api).
    assert answered[schemathesis.GenerationMode.POSITIVE] > 0
