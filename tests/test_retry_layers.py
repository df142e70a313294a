"""Each call path is retried at one level only (restic's ``backend/retry``: retry as a wrapper).

Counted at the simulator: a call that keeps failing is tried as often as the one policy of its
path says, never that times the policy of a layer beneath it. A transfer's retrieve is one API
attempt per transfer attempt (``workers.transfer_attempts``); a listing page, a retrieve for
``reconcile`` and a delete at the source are ``telnyx.max_attempts`` API attempts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from archiver.errors import ServerError
from archiver.filters import Filters
from archiver.models import Recording, State
from archiver.service import open_services
from archiver.simulator import Faults, Simulator, make_recordings
from archiver.telnyx import TelnyxClient
from archiver.transfer import Result, Transferer
from tests.conftest import make_settings

TRANSFER_ATTEMPTS = 3
API_ATTEMPTS = 4  # telnyx.max_attempts: never multiplied into a transfer's attempts


def api_calls(sim: Simulator, method: str, match: Callable[[str], bool]) -> int:
    return sum(1 for r in sim.api_requests if r.method == method and match(r.path))


def retrieves_of(sim: Simulator, recording_id: str) -> int:
    return api_calls(sim, "GET", lambda path: path.endswith(f"/room_recordings/{recording_id}"))


def settings_for(sim: Simulator, tmp_path: Path, **kw: Any) -> Any:
    return make_settings(
        sim,
        tmp_path,
        telnyx__max_attempts=API_ATTEMPTS,
        workers__transfer_attempts=TRANSFER_ATTEMPTS,
        workers__max_attempts=1,
        **kw,
    )


async def test_a_retrieve_that_keeps_failing_costs_one_api_call_per_transfer_attempt(
    sim_factory: Any, tmp_path: Path
) -> None:
    [sim_rec] = make_recordings(1, seed=71)
    sim: Simulator = await sim_factory([sim_rec], Faults(retrieve_error_rate=1.0))
    settings = settings_for(sim, tmp_path)
    async with open_services(settings) as services:
        assert services.api is not None and services.http is not None
        [listed] = (await services.api.list_page(Filters(), 1)).recordings
        assert await services.ledger.observe([listed]) == {listed.id}
        row = await services.ledger.get(listed.id)
        assert row is not None
        # As a sweep hands it over: without a URL, so the transfer must ask the API first.
        rec = Recording.from_row(row)
        assert not rec.download_url
        transferer = Transferer(
            source=services.api,
            http=services.http,
            storage=services.storage,
            ledger=services.ledger,
            settings=settings,
            owner="test",
        )
        outcome = await transferer.transfer(rec)
        assert outcome.result is Result.FAILED and outcome.error_kind is ServerError
        row = await services.ledger.get(rec.id)
        assert row is not None and (row.state, row.attempts) == (State.FAILED, 1)
    # 3 API calls, not 3 x 4 = 12: the transfer's loop is the only retry on this path.
    assert retrieves_of(sim, rec.id) == TRANSFER_ATTEMPTS
    assert sim.injected["retrieve:error"] == TRANSFER_ATTEMPTS
    assert sim.download_requests == []


async def test_a_retrieve_once_is_one_api_call(sim_factory: Any, tmp_path: Path) -> None:
    [sim_rec] = make_recordings(1, seed=72)
    sim: Simulator = await sim_factory([sim_rec], Faults(retrieve_error_rate=1.0))
    async with TelnyxClient(settings_for(sim, tmp_path).telnyx) as api:
        with pytest.raises(ServerError):
            await api.retrieve_once(sim_rec.id)
        assert retrieves_of(sim, sim_rec.id) == 1
        # The retrying entry point (``reconcile``'s): telnyx.max_attempts calls, no more.
        with pytest.raises(ServerError):
            await api.retrieve(sim_rec.id)
        assert retrieves_of(sim, sim_rec.id) == 1 + API_ATTEMPTS


async def test_a_listing_page_and_a_delete_are_retried_by_the_api_policy_once(
    sim_factory: Any, tmp_path: Path
) -> None:
    [sim_rec] = make_recordings(1, seed=73)
    sim: Simulator = await sim_factory(
        [sim_rec], Faults(list_error_rate=1.0, delete_error_rate=1.0)
    )
    async with TelnyxClient(settings_for(sim, tmp_path).telnyx) as api:
        with pytest.raises(ServerError):
            async for _ in api.iter_pages(Filters()):
                pass
        assert api_calls(sim, "GET", lambda path: path.endswith("/room_recordings")) == API_ATTEMPTS
        with pytest.raises(ServerError):
            await api.delete(sim_rec.id)
        assert api_calls(sim, "DELETE", lambda path: sim_rec.id in path) == API_ATTEMPTS
    assert sim_rec.id in sim.recordings  # nothing was deleted
