"""The Generator deployment's class, in-process (no Ray): with ``compile`` on it renders its
warm-up shapes while it starts, so no request pays for compiling."""

from __future__ import annotations

import pytest
import torch._dynamo

from deployments.generator import Generator


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled graphs are process-wide: none leaks into (or out of) this module."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_with_compile_on_the_generator_warms_its_shapes_up_before_it_takes_traffic(weights_dir):
    make = Generator.func_or_class
    compiled = make(None, str(weights_dir), optimizations="compile,compile_backend=eager",
                    warmup_shapes=[(64, 64, 1), (64, 96, 2)])
    warmed = compiled.ready()["warmed"]
    assert [(w["width"], w["height"], w["batch"]) for w in warmed] == [(64, 64, 1), (64, 96, 2)]
    assert all(w["seconds"] > 0 for w in warmed)
    eager = make(None, str(weights_dir), warmup_shapes=[(64, 64, 1)])
    assert eager.ready()["warmed"] == []  # nothing to compile: it takes traffic at once
