"""mpifc.hostmem: the allocator settings are applied at import, and can be turned off."""
import json
import subprocess
import sys

import pytest

PROBE = "import json, mpifc.hostmem as h; print(json.dumps(h.retain_freed_memory()))"


def _probe(env_extra):
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_applied_at_import():
    got = _probe({})
    if not got:       # a libc without mallopt (musl): nothing to check
        pytest.skip("mallopt not available")
    assert got == {"malloc_mmap_threshold": 32 << 20, "malloc_trim_threshold": 256 << 20,
                   "malloc_top_pad": 64 << 20}


def test_opt_out():
    assert _probe({"MPIFC_RETAIN_FREED_MEMORY": "0"}) == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_user_malloc_variable_wins():
    got = _probe({"MALLOC_TRIM_THRESHOLD_": str(1 << 20)})
    assert "malloc_trim_threshold" not in got
