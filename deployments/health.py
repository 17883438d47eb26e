"""``/healthz``: every stage's health as Serve's controller sees it (its own periodic
replica health checks), so a health probe never waits in a stage's request queue behind
renders.

A stage autoscaled to zero replicas (``min_replicas: 0``) is healthy: a request for it
waits while Serve starts a replica. Its entry says ``scaled_to_zero``, or ``starting``
while a replica comes up for such a request."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from .problems import error_response

STAGES = {"FaceEmbedder": "face", "Generator": "generator", "Postprocessor": "postprocessor",
          "JobRunner": "jobrunner", "RateLimiter": "ratelimiter", "Janitor": "janitor"}


def _value(enum_or_str) -> str:
    return str(getattr(enum_or_str, "value", enum_or_str))


def _replicas(deployment) -> dict[str, int]:
    """A deployment's replica count by state (``RUNNING``, ``STARTING``...), from serve.status()."""
    return {_value(k): v for k, v in deployment.replica_states.items()}


def state_of(status: str, replicas: dict[str, int]) -> str:
    """``running`` (a replica serves), ``scaled_to_zero`` (the autoscaler's target is no
    replica: Serve calls a deployment HEALTHY only when its target is met, and it has none
    in any state), ``starting`` (upscaling from zero), or ``unavailable`` (anything else
    without a running replica: a deploy in progress, a replica lost and being replaced)."""
    if replicas.get("RUNNING"):
        return "running"
    if status == "HEALTHY" and not any(replicas.values()):
        return "scaled_to_zero"
    if status == "UPSCALING":
        return "starting"
    return "unavailable"


def _stages() -> list[dict]:
    app = serve.get_replica_context().app_name
    deployments = serve.status().applications[app].deployments
    stages = []
    for name, stage in STAGES.items():
        if name not in deployments:
            continue
        status = _value(deployments[name].status)
        replicas = _replicas(deployments[name])
        stages.append({"stage": stage, "status": status, "state": state_of(status, replicas), "replicas": replicas})
    return stages


async def stage_health():
    stages = await asyncio.to_thread(_stages)
    unready = [s["stage"] for s in stages if s["state"] == "unavailable"]
    if unready:
        return error_response("unavailable", f"no replica of {', '.join(unready)} is running", retry_after_s=5)
    return {"status": "ok", "stages": stages}


class ReplicaWatch:
    """Whether one deployment of this replica's app has a running replica, asked of Serve's
    controller at most once per ``ttl_s`` while it has one (a render asks before each call:
    the answer only decides whether its caller is told that a replica is starting). While
    it has none, every question asks again."""

    def __init__(self, deployment: str, ttl_s: float = 2.0) -> None:
        self.deployment, self.ttl_s = deployment, ttl_s
        self._running_at = -float("inf")

    def _running(self) -> bool:
        app = serve.get_replica_context().app_name
        return bool(_replicas(serve.status().applications[app].deployments[self.deployment]).get("RUNNING"))

    async def running(self) -> bool:
        if time.monotonic() - self._running_at < self.ttl_s:
            return True
        try:
            running = await asyncio.to_thread(self._running)
        except Exception:  # noqa: BLE001 - no answer: assume it runs (the call waits either way)
            return True
        if running:
            self._running_at = time.monotonic()
        return running
