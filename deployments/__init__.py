"""InstantID as a Ray Serve application: thin deployments around ``pipeline``.

Modules: ``app`` (the one builder), ``ingress`` (HTTP API, auth, error mapping),
``face`` / ``generator`` / ``postprocess`` (the stages), ``storage`` and ``auth`` (plain
Python, no Ray), ``local`` (``instantid serve``: the same app on a local Ray).
"""
