"""Fixtures shared by the engine tests."""

import pytest

import fedsim.models.batched as batched_module


@pytest.fixture
def vmap_rules(monkeypatch):
    """Call it to make the norm and pooling layers keep ``vmap``'s own batching rules
    instead of folding a cohort into one native call (fedsim.models.batched)."""
    def use() -> None:
        monkeypatch.setattr(batched_module, "folding_vmap", lambda: None)
    return use
