"""The round coordinator without Ray (an async class): an ask waits for its answer and gets it
the moment it exists, not at a next poll; an ask with nothing to answer ends after its wait."""

from __future__ import annotations

import asyncio

from workers.recipe.coordinator import STOP, RoundCoordinator


def test_an_idle_workers_ask_is_answered_when_the_round_is_submitted():
    async def scenario():
        coord = RoundCoordinator()
        asked = asyncio.ensure_future(coord.next_job(-1, wait_s=30))
        await asyncio.sleep(0.05)
        assert not asked.done()  # nothing submitted yet: it waits
        coord.submit({"round_index": 0, "key": "k"})
        return await asyncio.wait_for(asked, 5)  # by the submit, not by its 30 s wait's end

    assert asyncio.run(scenario()) == {"round_index": 0, "key": "k"}


def test_the_drivers_ask_gets_the_result_when_rank_0_finishes_and_none_after_its_wait():
    async def scenario():
        coord = RoundCoordinator()
        coord.submit({"round_index": 3})
        assert await coord.result(3, wait_s=0.05) is None  # not finished: None after the wait
        waiting = asyncio.ensure_future(coord.result(3, wait_s=30))
        await asyncio.sleep(0.05)
        coord.finish(3, {"step": 7})
        result = await asyncio.wait_for(waiting, 5)
        # a finished round is no longer handed out; the next ask past it waits for round 4
        assert await coord.next_job(2, wait_s=0.05) is None
        return result, coord.in_flight()

    assert asyncio.run(scenario()) == ({"step": 7}, False)


def test_stop_ends_every_waiting_ask():
    async def scenario():
        coord = RoundCoordinator()
        asks = [asyncio.ensure_future(coord.next_job(0, wait_s=30)) for _ in range(3)]
        await asyncio.sleep(0.05)
        coord.stop()
        return await asyncio.wait_for(asyncio.gather(*asks), 5)

    assert asyncio.run(scenario()) == [STOP, STOP, STOP]


def test_the_references_to_a_rounds_weights_go_to_the_first_asker_only():
    """Kept by the coordinator, the object-store references of every round's weights would
    keep them all alive (workers.weight_sync): the driver's ask takes them."""
    async def scenario():
        coord = RoundCoordinator()
        coord.submit({"round_index": 0})
        coord.finish(0, {"step": 2, "weights": ["ref-a", "ref-b"]})
        first = await coord.result(0)
        again = await coord.result(0)
        return first, again

    assert asyncio.run(scenario()) == ({"step": 2, "weights": ["ref-a", "ref-b"]}, {"step": 2})
