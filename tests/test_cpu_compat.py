"""The CPU compatibility layer patches megatron-core at named sites; if megatron-core changes any
of them (e.g. an upgrade), this fails so that each patch is re-checked against the new code."""
import pytest

from megatron_sdmoe.runtime.cpu_compat import PATCHED_SITES


@pytest.mark.parametrize("site", PATCHED_SITES, ids=lambda s: s.qualname)
def test_patched_site_unchanged(site):
    assert site.current_sha256() == site.sha256, (
        f"megatron-core changed {site.module}.{site.qualname}: re-check its patch in runtime/cpu_compat.py, "
        "then update the recorded hash")
