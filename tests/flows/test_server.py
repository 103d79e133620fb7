"""The flow against a Prefect server started with `prefect server start --host 127.0.0.1`."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import DEMO_CONFIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.server
@pytest.mark.slow
def test_cli_run_against_started_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, "prefect server exited"
            assert time.monotonic() < deadline, "prefect server did not start in 240 s"
            time.sleep(1)
        run = subprocess.run(
            [sys.executable, "-m", "partdistill", "run", str(DEMO_CONFIG), "--until", "data",
             "--store", str(tmp_path / "store"), "-o", "data.partsworld.images=4",
             "-o", "data.partsworld.width=96", "-o", "data.partsworld.height=64"],
            env={**env, "PREFECT_API_URL": api}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Starting temporary server" not in run.stderr  # used ours, not an ephemeral one
        flow_runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        assert [(r["name"] != "", r["state"]["type"]) for r in flow_runs] == [(True, "COMPLETED")]
        task_runs = httpx.post(f"{api}/task_runs/filter", json={}, timeout=10).json()
        assert {r["name"]: r["state"]["name"] for r in task_runs} == {"data": "Completed"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
