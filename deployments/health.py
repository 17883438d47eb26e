"""``/healthz``: every stage's health as Serve's controller sees it (its own periodic
replica health checks), so a health probe never waits in a stage's request queue behind
renders."""

from __future__ import annotations

import asyncio

from ray import serve

from .problems import error_response

STAGES = {"FaceEmbedder": "face", "Generator": "generator", "Postprocessor": "postprocessor",
          "JobRunner": "jobrunner", "RateLimiter": "ratelimiter", "Janitor": "janitor"}


def _stages() -> list[dict]:
    app = serve.get_replica_context().app_name
    deployments = serve.status().applications[app].deployments
    return [{"stage": stage, "status": str(deployments[name].status.value if hasattr(deployments[name].status, "value")
                                            else deployments[name].status),
             "replicas": {str(k.value if hasattr(k, "value") else k): v
                          for k, v in deployments[name].replica_states.items()}}
            for name, stage in STAGES.items() if name in deployments]


async def stage_health():
    stages = await asyncio.to_thread(_stages)
    unready = [s["stage"] for s in stages if not s["replicas"].get("RUNNING")]
    if unready:
        return error_response("unavailable", f"no replica of {', '.join(unready)} is running", retry_after_s=5)
    return {"status": "ok", "stages": stages}
