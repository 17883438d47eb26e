"""InstantID as a Ray Serve application: thin deployments over ``service`` and ``pipeline``.

Modules: ``app`` (the one builder), ``ingress`` (the HTTP routes) and the modules it stands
on (``security``, ``inputs``, ``flow``, ``submissions``, ``views``, ``problems``, ``web``,
``health``), the stages (``face``, ``generator``, ``postprocess``), the job runner
(``runner``), ``ratelimit``, ``janitor``, ``local`` (``instantid serve``: the same app on a
local Ray) and ``cli``.
"""
