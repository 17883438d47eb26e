"""Benchmarks of the InstantID pipeline and service: ``python -m bench --help``.

Every benchmark writes one CSV row per case (every setting, the hardware, the date, the
median and spread over timed runs after warm-up) and a markdown table; see
``docs/PERFORMANCE.md`` for the latest numbers and the exact commands.
"""
