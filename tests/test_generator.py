"""The Generator deployment's class, in-process (no Ray): it warms up while it starts (with
``compile`` on, at every warm-up shape), so no request pays for compiling or for a first
render's one-time costs; its batching loop is a ``user_config`` choice."""

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
    eager = make(None, str(weights_dir), warmup_shapes=[(64, 96, 2)])
    # nothing to compile: one small render pays the first render's one-time costs, whatever the shapes
    [small] = eager.ready()["warmed"]
    assert (small["width"], small["height"], small["batch"]) == (64, 64, 1) and small["seconds"] > 0


def test_the_batching_loop_is_chosen_in_user_config_and_a_bad_choice_is_refused(weights_dir):
    from pipeline.errors import InvalidParameter

    generator = Generator.func_or_class(None, str(weights_dir))
    assert generator.status()["batching"] == "step"  # the default, before any user_config
    generator.reconfigure({"batching": "request", "max_batch_images": 2})
    assert generator.status() == {"batching": "request", "rendering": 0, "waiting": 0}
    assert generator.ready()["batching"] == "request"
    with pytest.raises(InvalidParameter) as refused:
        generator.reconfigure({"batching": "iteration"})
    assert refused.value.field == "batching" and "'step'" in str(refused.value)
    assert generator.batching == "request"  # the last good config stays
    generator.reconfigure({"batching": "step", "max_batch_images": 3})
    assert generator.batching == "step" and generator.max_batch_images == 3
