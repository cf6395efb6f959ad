"""The fault suite, short version: a real worker on its own Redis (AOF) and PostgreSQL, a batch of small
contracts, one fault injected at a random point, the invariants checked (`harness.check_invariants`).
The full suite (every fault, more documents) is `python tests/faults/harness.py --faults all`."""
from __future__ import annotations

import shutil

import pytest

from faults.harness import POSTGRES_BIN, Rig, fault_settings, run_fault

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (POSTGRES_BIN / "initdb").exists() or shutil.which("redis-server") is None or shutil.which("runuser") is None,
    reason="needs PostgreSQL's server binaries, redis-server and runuser to start services of its own")]


@pytest.fixture(scope="module")
def rig(small_model_dir, tmp_path_factory):
    """One set of services and one worker for both runs (each run submits documents of its own)."""
    folder = tmp_path_factory.mktemp("faults")
    with Rig(folder, fault_settings(folder / "home", str(small_model_dir))) as rig:
        yield rig


# Two of the harness's faults; a lost message (Redis wiped) is the sweep's, tested in test_reconcile.py.
@pytest.mark.parametrize("fault", ["kill_infer", "poison"])
def test_nothing_is_lost_and_only_a_poison_document_fails(fault, rig):
    outcome = run_fault(fault, rig, num_docs=12, seed=1)
    assert outcome.violations == []
    if fault == "poison":
        assert outcome.failures == {"docs/hostile.txt": "too_many_attempts"} and outcome.states["done"] == 12
    else:
        assert outcome.states == {"done": 12}
