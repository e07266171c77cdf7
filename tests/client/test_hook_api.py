"""A hook written for the earlier, model-mutating hook API is refused when it is defined,
with what to write instead (it would otherwise be skipped silently or fail mid-run)."""

import pytest

from fedsim.client.hooks import LEGACY_HOOK_METHODS, ClientHook


@pytest.mark.parametrize("method", sorted(LEGACY_HOOK_METHODS))
def test_a_hook_with_a_legacy_method_is_refused_with_its_replacement(method):
    with pytest.raises(TypeError, match=rf"defines {method}, which fedsim no longer calls"):
        type("OldHook", (ClientHook,), {method: lambda self, *a: None})


def test_on_receive_without_arrays_is_refused_naming_the_new_signature():
    with pytest.raises(TypeError, match=r"on_receive\(self, model, arrays\)"):
        type("OldReceive", (ClientHook,), {"on_receive": lambda self, model: None})


def test_a_hook_in_the_current_api_defines_fine():
    class Fine(ClientHook):
        def on_receive(self, model, arrays):
            pass

        def loss_term(self, params, state):
            return None

    assert Fine.activated_by is None
