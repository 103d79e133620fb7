"""Two runs at once on one store: each stage version is computed by one of them only."""

import os
import subprocess
import sys
from collections import Counter

import pytest

from partdistill.storage import ArtifactStore
from tests.conftest import DEMO_CONFIG, REPO, TINY


def _options(**extra) -> list[str]:
    out = []
    for key, value in {**TINY, **extra}.items():
        out += ["-o", f"{key}={value!r}"]
    return out


def _start(store, until, engine="local", **extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "partdistill", "run", str(DEMO_CONFIG), "--engine", engine, "--until", until,
         "--store", str(store), *_options(**extra)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _outcomes(proc: subprocess.Popen) -> dict[str, tuple[str, str]]:
    """stage → (version, state) from the run's report lines."""
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    rows = {}
    for line in err.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[4] == "s" and len(parts[1]) == 16:
            rows[parts[0]] = (parts[1], parts[2])
    return rows


@pytest.mark.slow
def test_two_runs_of_one_config_compute_each_stage_once(tmp_path):
    store = tmp_path / "store"
    a, b = _start(store, "features"), _start(store, "features")
    ra, rb = _outcomes(a), _outcomes(b)
    assert list(ra) == list(rb) == ["data", "teacher", "instances", "features"]
    for stage in ra:
        assert ra[stage][0] == rb[stage][0]
        states = sorted([ra[stage][1], rb[stage][1]])
        # one computes; the other waited on the lock and reused it, or started after it finished
        assert states in (["computed", "reused"], ["computed", "skipped"]), (stage, states)
    st = ArtifactStore(store)
    assert st.verify() == []
    assert all(len(st.versions(s)) == 1 and not st.partial_versions(s) for s in ra)


@pytest.mark.slow
def test_two_configs_share_their_common_stages(tmp_path):
    """Configs differing only in mining.k: the stages before mining are computed once."""
    store = tmp_path / "store"
    opts = {"mining.crf.enabled": False}
    a, b = _start(store, "mining", **opts, **{"mining.k": 3}), _start(store, "mining", **opts, **{"mining.k": 5})
    ra, rb = _outcomes(a), _outcomes(b)
    for stage in ("data", "teacher", "instances", "features"):
        assert ra[stage][0] == rb[stage][0]
        assert Counter([ra[stage][1], rb[stage][1]])["computed"] == 1, (stage, ra[stage], rb[stage])
    assert ra["mining"][0] != rb["mining"][0]
    assert ra["mining"][1] == rb["mining"][1] == "computed"
    st = ArtifactStore(store)
    assert st.verify() == [] and len(st.versions("mining")) == 2 and len(st.versions("features")) == 1


@pytest.mark.slow
def test_two_prefect_flow_runs_at_once(tmp_path):
    """The default engine: two ephemeral Prefect servers on one PREFECT_HOME (one SQLite
    database) and one store. Both runs finish; the stage is computed once."""
    store = tmp_path / "store"
    a, b = _start(store, "data", engine="prefect"), _start(store, "data", engine="prefect")
    ra, rb = _outcomes(a), _outcomes(b)
    assert sorted([ra["data"][1], rb["data"][1]]) in (["computed", "reused"], ["computed", "skipped"])
    assert ArtifactStore(store).verify() == []
