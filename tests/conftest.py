from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (starting Ray costs seconds), 2 CPUs like the target machine."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from tests.tiny_models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))
