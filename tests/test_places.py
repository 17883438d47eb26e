"""A key's count of unfinished jobs, on the local folder and on SeaweedFS: exact when
replicas take the last places at the same instant."""

from __future__ import annotations

import time

from deployments.janitor import sweep
from service.places import JobPlaces
from tests.test_claims_and_leases import race, store  # noqa: F401 - the fixture

LATER = 10_000_000_000.0


def test_places_taken_at_the_same_instant_never_pass_the_cap(store):  # noqa: F811
    places = JobPlaces(store)
    taken = race(12, lambda n: places.take("o_a", f"g_{n:022d}", LATER, cap=3))
    assert sum(taken) == 3 and places.count("o_a") == 3
    assert places.take("o_b", "g_" + "b" * 22, LATER, cap=3)  # keys do not share a count


def test_a_place_comes_back_when_its_job_ends_and_a_job_keeps_its_own(store):  # noqa: F811
    places = JobPlaces(store)
    assert places.take("o_a", "g_1", LATER, cap=1)
    assert places.take("o_a", "g_1", LATER, cap=1)  # a retry of the same job holds the same place
    assert not places.take("o_a", "g_2", LATER, cap=1)
    places.give_back("o_a", "g_1")
    places.give_back("o_a", "g_1")  # twice: nothing more happens
    assert places.take("o_a", "g_2", LATER, cap=1)


def test_a_lapsed_place_is_not_counted_and_the_janitor_sweeps_a_count_of_lapsed_places(store):  # noqa: F811
    now = [time.time()]  # a clock of the test's own: a slow store cannot make a place lapse early
    places = JobPlaces(store, clock=lambda: now[0])
    assert places.take("o_a", "g_1", now[0] + 0.5, cap=1)
    assert not places.take("o_a", "g_2", LATER, cap=1)
    now[0] += 0.6
    assert places.count("o_a") == 0 and places.take("o_a", "g_2", now[0] + 0.5, cap=1)
    assert sweep(store, now=now[0] + 1)["job_places"] == 1
    assert store.list_keys("jobs/owners") == []
