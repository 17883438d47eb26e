"""What a replica can learn about its own life from Ray Serve."""

from __future__ import annotations


def replica_is_stopping() -> bool:
    """Whether Serve has begun stopping this replica (a downscale or a redeploy: its
    graceful shutdown, during which it still serves its ongoing requests).

    Ray Serve 2.60 has no public hook for this; the replica actor's implementation flips
    ``_shutting_down`` when its graceful shutdown starts (ray/serve/_private/replica.py,
    ``Replica._perform_graceful_shutdown``). Outside a replica, or should Ray change this,
    the answer is False: jobs are then taken over when their lease expires instead of at
    once (slower, equally correct)."""
    try:
        from ray._private.worker import global_worker

        actor = global_worker.actors.get(global_worker.actor_id)
        return bool(getattr(getattr(actor, "_replica_impl", None), "_shutting_down", False))
    except Exception:  # noqa: BLE001 - not a replica, or Ray's internals moved
        return False
