"""`partdistill serve`: its deployments, its server handling, and a run started through the API."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import DEMO_CONFIG, TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage_deployments_cover_every_stage_and_round():
    from partdistill.config import load_config
    from partdistill.flows.serve import stage_deployment_names

    cfg = load_config(DEMO_CONFIG, {"proposals.rounds": 2, "distill.rounds": 1})
    assert stage_deployment_names(cfg) == ["data", "teacher", "instances", "features", "mining", "proposals",
                                           "proposals_r1", "proposals_r2", "ranking", "distill", "distill_r1",
                                           "evaluate"]


def test_build_deployments_parameters_and_entrypoint(tmp_path):
    from partdistill.config import load_config
    from partdistill.flows.serve import build_deployments

    cfg = load_config(DEMO_CONFIG, {"proposals.rounds": 2})
    deployments = build_deployments(str(DEMO_CONFIG), cfg, str(tmp_path / "store"), ["mining.k=6"])
    by_name = {d.name: d for d in deployments}
    assert list(by_name)[0] == "pipeline" and "proposals_r2" in by_name and "evaluate" in by_name
    assert {d.flow_name for d in deployments} == {"partdistill"}
    assert by_name["pipeline"].parameters == {"config": str(DEMO_CONFIG), "store": str(tmp_path / "store"),
                                              "cfg_options": ["mining.k=6"]}
    assert by_name["proposals_r1"].parameters["until"] == "proposals_r1"
    assert "only" not in by_name["teacher"].parameters
    # the runner imports the flow by module, whatever directory serve was started in
    assert by_name["data"].entrypoint == "partdistill.flows.pipeline.pipeline_flow"
    # the parameters the UI's run form offers are the flow's, with their descriptions
    from prefect.utilities.callables import parameter_schema

    from partdistill.flows.pipeline import pipeline_flow

    schema = parameter_schema(pipeline_flow.fn).properties
    assert set(schema) == {"config", "until", "only", "store", "cfg_options"}
    assert all(p.get("description") for p in schema.values())


def test_ui_url_and_health_of_nothing():
    from partdistill.flows.serve import api_healthy, ui_url

    assert ui_url("http://127.0.0.1:4200/api") == "http://127.0.0.1:4200"
    assert ui_url("http://host:1/api/") == "http://host:1"
    assert not api_healthy(f"http://127.0.0.1:{_free_port()}/api", timeout=1)


def test_local_server_refuses_a_busy_port(tmp_path):
    from partdistill.flows.serve import LocalServer, ServeError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ServeError, match="in use"):
            LocalServer(busy.getsockname()[1], tmp_path / "server.log").start()


def test_serve_command_rejects_a_bad_config_before_starting_anything(tmp_path):
    from partdistill.cli import app

    result = CliRunner().invoke(app, ["serve", str(DEMO_CONFIG), "-o", "nosuchsection.k=1",
                                      "--port", str(_free_port())])
    assert result.exit_code == 2, result.output


@pytest.mark.server
@pytest.mark.slow
def test_serve_runs_a_stage_deployment_started_through_the_api(tmp_path):
    """serve with a PREFECT_API_URL that does not answer: it starts its own server on 127.0.0.1,
    serves the deployments, runs one started through the REST API, and stops the server on Ctrl+C.
    The first run is killed (SIGKILL) after the data stage's first shard; the deployment started
    again, as from the UI, resumes that stage and completes."""
    from partdistill.storage import ArtifactStore

    start = time.monotonic()
    port, dead = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{dead}/api",
               PREFECT_RUNNER_POLL_FREQUENCY="2", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PARTDISTILL_KILL_AT="shard-marker:2", PARTDISTILL_KILL_ONCE=str(tmp_path / "killed"))
    log = tmp_path / "serve.log"
    exe = Path(sys.executable).parent / "partdistill"
    with open(log, "wb") as out:
        serve = subprocess.Popen([str(exe), "serve", str(DEMO_CONFIG), "--port", str(port), "--store",
                                  str(tmp_path / "store")], env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api", timeout=30)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert serve.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                deployment = api.get("/deployments/name/partdistill/data").json()
                if "id" in deployment:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        text = log.read_text()
        assert "does not answer; using a local server instead" in text
        assert f"Prefect UI: http://127.0.0.1:{port}" in text
        assert "prefect deployment run 'partdistill/pipeline'" in text

        options = [f"{k}={v!r}" for k, v in TINY.items()]

        def run_deployment() -> tuple[dict, str]:
            for _ in range(3):  # a busy machine's server can answer 5xx once (SQLite busy)
                response = api.post(f"/deployments/{deployment['id']}/create_flow_run",
                                    json={"parameters": {"cfg_options": options}})
                if response.status_code < 500:
                    break
                time.sleep(2)
            run = response.json()
            assert "id" in run, f"{response.status_code}: {response.text[:2000]}"
            while (state := api.get(f"/flow_runs/{run['id']}").json()["state"]["type"]) not in (
                    "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(1)
            return run, state

        store = ArtifactStore(tmp_path / "store")  # the store given to serve
        _, state = run_deployment()
        assert state in ("CRASHED", "FAILED") and (tmp_path / "killed").exists(), log.read_text()
        [version] = store.partial_versions("data")
        assert store.versions("data") == [] and store.partial_progress("data", version)[0] == 1

        run, state = run_deployment()  # started again, as the UI's Run button does
        assert state == "COMPLETED", log.read_text()
        assert store.versions("data") == [version] and store.partial_versions("data") == []
        assert store.verify() == []
        artifacts = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
        assert {"data-summary", "data-metrics", "data-progress", "data-preview"} <= {a["key"] for a in artifacts}
    finally:
        api.close()
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            raise
    with pytest.raises(httpx.HTTPError):  # the server serve started is gone
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
    assert time.monotonic() - start < 120


_HUNG_RUNNER = """
import os, signal, sys, time
from partdistill.flows.serve import _BoundedInterrupt
with _BoundedInterrupt(float(sys.argv[1]), [], lambda m: print(m, flush=True)):
    try:  # "serving" inside the try: a Ctrl+C that lands just after it is still the runner's
        print("serving", flush=True)
        time.sleep(30)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        if sys.argv[2] == "hang":  # a runner whose shutdown never ends
            time.sleep(30)
time.sleep(float(sys.argv[1]) + 1)  # after a clean shutdown the timer must not fire
print("clean exit", flush=True)
"""


@pytest.mark.parametrize("shutdown", ["hang", "clean"])
def test_ctrl_c_ends_serving_within_the_grace_period(shutdown):
    """A runner that never finishes shutting down is ended 1 s after Ctrl+C with exit code 130;
    one that shuts down cleanly exits normally, and the timer does not fire afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", _HUNG_RUNNER, "1", shutdown], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "serving"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert out.splitlines()[0] == "interrupted"
    if shutdown == "hang":
        assert proc.returncode == 130 and "serving had not stopped 1 s after Ctrl+C" in out
        assert time.monotonic() - start < 10
    else:
        assert proc.returncode == 0 and out.splitlines()[-1] == "clean exit" and "had not stopped" not in out
