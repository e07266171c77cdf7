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


@pytest.fixture
def pushed_types(monkeypatch):
    """Call it with a Grid class: the message types every ``push_messages`` of that class
    sends from then on are appended to the list it returns."""
    def watch(grid_cls) -> list[str]:
        pushed: list[str] = []
        push = grid_cls.push_messages

        def counting_push(self, messages):
            messages = list(messages)
            pushed.extend(m.metadata.message_type for m in messages)
            return push(self, messages)

        monkeypatch.setattr(grid_cls, "push_messages", counting_push)
        return pushed
    return watch
