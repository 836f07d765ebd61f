"""The load signal of the simulated fleet: routers see the pods' /metrics as of the latest
scrape (real engines, real ZMQ, a real in-process kvcache); the oracle sees the live state."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kvcache.routing import PodLoad
from kvcache.sim.fleet import DEFAULT_SCRAPE_INTERVAL, Fleet, FleetSpec, build_policy, simulate
from kvcache.sim.policies import RouteContext
from kvcache.sim.timing import Job
from kvcache.sim.workloads import generate


def fleet(interval: float) -> Fleet:
    return Fleet(FleetSpec(pods=2, capacity_blocks=256, scrape_interval=interval))


def test_routers_see_the_latest_scrape_until_the_next_tick() -> None:
    with fleet(0.01) as sim:
        sim.observe(0.0)
        assert [load.scraped_at for load in sim.loads()] == [0.0, 0.0]
        sim.schedulers[0].submit(Job("r1", list(range(40)), [1, 2], 0.001))
        assert sim.live_loads()[0].waiting == 1
        sim.observe(0.009)  # no tick since 0: still the scrape of 0
        assert sim.loads()[0] == PodLoad(sim.pods[0], queued_prefill_tokens=0, scraped_at=0.0)
        sim.observe(0.0123)
        assert sim.loads()[0].waiting == 1
        assert sim.loads()[0].scraped_at == pytest.approx(0.01)
        sim.observe(0.0371)  # ticks 0.02 and 0.03 passed without events: the latest counts
        assert sim.loads()[0].scraped_at == pytest.approx(0.03)
        assert sim.scrapes == 3


def test_interval_zero_is_the_live_state() -> None:
    with fleet(0.0) as sim:
        sim.observe(0.0)
        sim.schedulers[1].submit(Job("r1", list(range(40)), [1, 2], 0.0))
        assert sim.loads() == sim.live_loads()
        assert sim.loads()[1].waiting == 1
        assert sim.loads()[1].scraped_at is None
        assert sim.scrapes == 0


def test_default_interval_keeps_llm_d_arrivals_per_refresh_at_the_top_rate() -> None:
    # llm-d: 50 ms refresh at 60 QPS = 3 arrivals per refresh; the sim's top rate is 200 QPS.
    interval = FleetSpec().scrape_interval
    assert interval == DEFAULT_SCRAPE_INTERVAL
    assert interval * 200 == pytest.approx(3.0)


@dataclass
class Recorder:
    """Round robin that keeps every context it was given."""

    name: str = "recorder"
    seen: list[RouteContext] = field(default_factory=list)

    def choose(self, ctx: RouteContext) -> str:
        self.seen.append(ctx)
        return ctx.loads[len(self.seen) % len(ctx.loads)].pod


def test_every_decision_between_two_ticks_sees_the_same_snapshot() -> None:
    interval = 0.05
    requests = generate("shared-prefix", 80, 200.0, 0)
    recorder = Recorder()
    with fleet(interval) as sim:
        simulate(sim, recorder, requests, qps=200.0, workload="shared-prefix")
    stale = 0
    for ctx in recorder.seen:
        (stamp,) = {load.scraped_at for load in ctx.loads}
        assert stamp is not None
        assert stamp <= ctx.now < stamp + interval + 1e-9
        assert all(load.scraped_at is None for load in ctx.live_loads)
        stale += [load.waiting for load in ctx.loads] != [load.waiting for load in ctx.live_loads]
    by_tick: dict[float, list[RouteContext]] = {}
    for ctx in recorder.seen:
        by_tick.setdefault(ctx.loads[0].scraped_at or 0.0, []).append(ctx)
    assert any(len(group) > 1 for group in by_tick.values())  # 10 arrivals per tick on average
    for group in by_tick.values():
        assert all(ctx.loads == group[0].loads for ctx in group)
    assert stale > 0  # the snapshot did lag the live queues


def test_the_oracle_keeps_the_live_state_whatever_the_interval() -> None:
    requests = generate("shared-prefix", 80, 200.0, 0)
    runs = []
    for interval in (0.0, 0.05):
        with fleet(interval) as sim:
            policy = build_policy("oracle", sim, requests, 0)
            runs.append(simulate(sim, policy, requests, qps=200.0, workload="shared-prefix"))
    live, scraped = runs
    assert [d.pod for d in live.decisions] == [d.pod for d in scraped.decisions]
    assert live.ttft == scraped.ttft
