"""The serving layer's plain-Python core (no Ray): typed records, the storage key layout
and stores, the one render path and the one store step, durable jobs and idempotency
claims, lookups with the owner and expiry rules, and the app's configuration. The Ray Serve
deployments (:mod:`deployments`) and the offline renderer (:mod:`cluster.render`) are thin
layers over it."""
