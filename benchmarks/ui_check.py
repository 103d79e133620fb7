"""End-to-end check of `partdistill serve` and the Prefect UI, in headless Chromium.

    .venv/bin/python benchmarks/ui_check.py [--until features] [--port N] [--shots docs/ui]

1. starts `partdistill serve` with its own PREFECT_HOME (a temp dir), port and store; it starts
   its own Prefect server on 127.0.0.1;
2. waits until the deployments are registered, then starts a run of `partdistill/<until>` through
   the REST API with the tests' tiny overrides (tests/conftest.py TINY) and waits for COMPLETED;
3. reads the run's artifacts back through the API: every stage's summary, metrics table and
   progress (at 100 %);
4. in headless Chromium: finds the deployment on the deployments page, opens it, opens the
   completed flow run from its runs list, clicks the run's Artifacts tab and finds the stage
   artifacts there, then the artifacts page, a metrics table and a progress artifact;
5. stops `partdistill serve` (SIGINT, as Ctrl+C) and checks that the server it started is gone.

Screenshots go to --shots (PNG). Prints one PASS/FAIL line per check, with timings, and exits 1
if any check failed. Needs selenium (the `dev` extra), /usr/bin/chromium and /usr/bin/chromedriver.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1440,1000"]
results: list[tuple[bool, str]] = []


def check(ok: bool, what: str) -> bool:
    results.append((ok, what))
    print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.5, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # not there yet (a page still loading, an API still starting)
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def tiny_overrides() -> list[str]:
    from tests.conftest import TINY

    return [f"{k}={v!r}" for k, v in TINY.items()]


def expected_stage_deployments() -> list[str]:
    from partdistill.config import load_config
    from partdistill.flows.serve import stage_deployment_names

    return stage_deployment_names(load_config(REPO / "configs" / "demo_partsworld.py"))


def start_serve(home: Path, store: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               # pick a new run up within 2 s (default 10 s)
               PREFECT_RUNNER_POLL_FREQUENCY="2")
    exe = Path(sys.executable).parent / "partdistill"
    with open(log, "wb") as out:
        return subprocess.Popen([str(exe), "serve", str(REPO / "configs" / "demo_partsworld.py"), "--port", str(port),
                                 "--store", str(store)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def browser(user_data_dir: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def link(driver, text: str, href_part: str):
    """The visible link with this text whose address contains href_part."""
    from selenium.webdriver.common.by import By

    for a in driver.find_elements(By.TAG_NAME, "a"):
        if a.text.strip() == text and href_part in (a.get_attribute("href") or "") and a.is_displayed():
            return a
    return None


def tab(driver, text: str):
    """The page's tab labelled ``text`` (the Prefect UI draws tabs as ``[role=tablist] li``)."""
    from selenium.webdriver.common.by import By

    for el in driver.find_elements(By.CSS_SELECTOR, "[role=tablist] li, [role=tab]"):
        if el.text.strip() == text and el.is_displayed():
            return el
    return None


def ui_checks(ui: str, flow_run: dict, deployment: str, stages: list[str], shots: Path) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    driver = browser(tempfile.mkdtemp(prefix="ui-check-chromium-"))
    check(True, f"chromium: headless browser started in {time.monotonic() - start:.1f} s")

    def step(what: str, shot: str, body: Callable[[], str], missing: Callable[[], str] = lambda: "") -> bool:
        """Run one page check: ``body`` waits for the page and says what it saw; then a screenshot."""
        t = time.monotonic()
        try:
            seen = body()
        except TimeoutError as err:
            driver.save_screenshot(str(shots / shot))
            return check(False, f"{what}: {err}{missing()}")
        driver.save_screenshot(str(shots / shot))
        return check(True, f"{what}: {seen} ({time.monotonic() - t:.1f} s) -> {shots / shot}")

    found: dict[str, Any] = {}

    def deployments_page() -> str:
        # the deployments page lists ours
        driver.get(f"{ui}/deployments")
        found["deployment"] = wait_for(lambda: "pipeline" in body_text(driver)
                                       and link(driver, deployment, "/deployments/deployment/"),
                                       60, what="the deployments list")
        return f"lists partdistill/pipeline and partdistill/{deployment}"

    def deployment_page() -> str:
        # open the deployment; its runs list has the completed run
        found["deployment"].click()
        found["run"] = wait_for(lambda: link(driver, flow_run["name"], f"/runs/flow-run/{flow_run['id']}"), 60,
                                what=f"flow run {flow_run['name']} in the deployment's runs")
        wait_for(lambda: "Completed" in body_text(driver), 20, what="its Completed state")
        return f"partdistill/{deployment} lists run '{flow_run['name']}' Completed"

    def flow_run_page() -> str:
        found["run"].click()
        wait_for(lambda: f"/runs/flow-run/{flow_run['id']}" in driver.current_url
                 and "Completed" in body_text(driver)
                 and all(s in body_text(driver) for s in stages), 60,
                 what="the flow run page with its state and task runs")
        return f"'{flow_run['name']}' Completed, task runs {', '.join(stages)} in its logs"

    expected = [f"{s}-{what}" for s in stages for what in ("summary", "metrics", "progress")]

    def artifacts_tab() -> str:
        # its Artifacts tab lists the stages' keyed artifacts
        tab_el = wait_for(lambda: tab(driver, "Artifacts"), 20, what="the Artifacts tab")
        tab_el.click()
        wait_for(lambda: all(k in body_text(driver) for k in expected), 60,
                 what=f"artifacts {', '.join(expected)} on the tab")
        driver.execute_script("arguments[0].scrollIntoView()", tab_el)  # the cards, in the picture
        time.sleep(1)
        return f"shows {len(expected)} keyed artifacts ({', '.join(expected)})"

    def artifacts_page() -> str:
        # the artifacts page: every key, latest first
        driver.get(f"{ui}/artifacts")
        wait_for(lambda: all(f"/artifacts/key/{k}" in driver.page_source for k in expected), 60,
                 what="every key on the artifacts page")
        return f"links to /artifacts/key/<key> for all {len(expected)} keys"

    def artifact_page(key: str, words: list[str]) -> Callable[[], str]:
        def body() -> str:
            driver.get(f"{ui}/artifacts/artifact/{flow_run['artifacts'][key]}")
            wait_for(lambda: all(w in body_text(driver) for w in words) and flow_run["name"] in body_text(driver),
                     60, what=f"{key}'s content")
            time.sleep(1)
            return f"shows {words} and the run"
        return body

    try:
        # each page is reached from the one before; the first failure of those ends the walk
        for what, shot, body in (("ui deployments page", "deployments.png", deployments_page),
                                 ("ui deployment page", "deployment.png", deployment_page),
                                 ("ui flow run page", "flow_run.png", flow_run_page)):
            if not step(what, shot, body):
                return
        step("ui flow run Artifacts tab", "flow_run_artifacts.png", artifacts_tab,
             lambda: f"; missing {[k for k in expected if k not in body_text(driver)]}")
        step("ui artifacts page", "artifacts.png", artifacts_page)
        # a metrics table and a progress artifact, as the UI draws them
        for key, shot, words in ((f"{stages[-1]}-metrics", "artifact_metrics.png", ["metric", "value"]),
                                 (f"{stages[0]}-progress", "artifact_progress.png", ["Progress: 100%"])):
            step(f"ui artifact page {key}", shot, artifact_page(key, words))
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--until", default="features", help="the stage deployment to run (default: features)")
    parser.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    parser.add_argument("--shots", type=Path, default=REPO / "docs" / "ui", help="where screenshots go")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the run may take")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (PREFECT_HOME, store, logs)")
    args = parser.parse_args()

    total = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="partdistill-ui-check-"))
    port = args.port or free_port()
    api, ui = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
    log = tmp / "serve.log"
    print(f"ui_check: temp dir {tmp}, port {port}, serve log {log}", flush=True)
    serve = start_serve(tmp / "prefect-home", tmp / "store", port, log)
    client = httpx.Client(base_url=api, timeout=30)
    try:
        _steps(args, serve, client, log, ui)
    finally:
        # 5. Ctrl+C stops serve, which stops the server it started
        t = time.monotonic()
        client.close()
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
            down = not _answers(api)
            check(down, f"stop: partdistill serve exited ({serve.returncode}) {time.monotonic() - t:.1f} s after "
                        f"SIGINT; the server it started {'is down' if down else 'STILL ANSWERS'}")
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            check(False, "stop: partdistill serve did not exit within 60 s of SIGINT; killed")
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    failed = [what for ok, what in results if not ok]
    print(f"{'PASS' if not failed else 'FAIL'} ui_check: {len(results) - len(failed)}/{len(results)} checks "
          f"passed in {time.monotonic() - total:.1f} s", flush=True)
    return 1 if failed else 0


def _steps(args, serve: subprocess.Popen, client: httpx.Client, log: Path, ui: str) -> None:
    # 1. serve: server up, deployments registered
    t = time.monotonic()
    try:
        names = ["pipeline", *expected_stage_deployments()]
        registered = wait_for(lambda: serve.poll() is None and (got := sorted(
            d["name"] for d in client.post("/deployments/filter", json={}).json())) == sorted(names) and got,
            300, 1, f"deployments {', '.join(names)}")
        deployment = client.get(f"/deployments/name/partdistill/{args.until}").json()
        started_own = "started here" in log.read_text()
        check(args.until in registered, f"serve: server up and all {len(registered)} deployments registered "
              f"(partdistill/pipeline + one per stage and round) in {time.monotonic() - t:.1f} s; "
              f"{'its own server on 127.0.0.1' if started_own else 'an existing server'}")
    except TimeoutError as err:
        check(False, f"serve: {err}; exit code {serve.poll()}; log:\n{log.read_text()[-3000:]}")
        return

    # 2. a run with tiny overrides, through the API
    t = time.monotonic()
    options = tiny_overrides()
    run = client.post(f"/deployments/{deployment['id']}/create_flow_run",
                      json={"parameters": {"cfg_options": options}}).json()
    try:
        final = wait_for(lambda: (r := client.get(f"/flow_runs/{run['id']}").json())["state"]["type"] in (
            "COMPLETED", "FAILED", "CRASHED", "CANCELLED") and r, args.timeout, 1, "the flow run to finish")
    except TimeoutError as err:
        check(False, f"run: partdistill/{args.until}: {err}")
        return
    task_runs = client.post("/task_runs/filter", json={
        "flow_runs": {"id": {"any_": [run["id"]]}}}).json()
    stages = [tr["name"] for tr in sorted(task_runs, key=lambda tr: tr["expected_start_time"])]
    if not check(final["state"]["type"] == "COMPLETED",
                 f"run: partdistill/{args.until} with {len(options)} tiny overrides (tests/conftest.py TINY) "
                 f"{final['state']['type']} in {time.monotonic() - t:.1f} s (flow run '{final['name']}', "
                 f"{final['total_run_time']:.1f} s running; task runs {', '.join(stages)})"):
        print(log.read_text()[-3000:])
        return

    # 3. its artifacts through the API
    artifacts = client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    by_key = {a["key"]: a for a in artifacts}
    expected = [f"{s}-{what}" for s in stages for what in ("summary", "metrics", "progress")]
    progress = {k: a["data"] for k, a in by_key.items() if a["type"] == "progress"}
    links = sorted(k for k, a in by_key.items() if "](file://" in str(a["data"]))
    check(all(k in by_key for k in expected) and all(float(v) == 100.0 for v in progress.values())
          and any(a["type"] == "table" for a in artifacts),
          f"artifacts (API): {len(artifacts)} keyed artifacts, summary+metrics+progress for each of "
          f"{len(stages)} stages, progress {sorted(set(progress.values()))} %, links {', '.join(links)}")
    final["artifacts"] = {k: a["id"] for k, a in by_key.items()}

    # 4. the UI, in Chromium
    try:
        ui_checks(ui, final, args.until, stages, args.shots)
    except Exception as err:  # no selenium, no chromium, a page that changed shape
        check(False, f"ui: {type(err).__name__}: {err}")


def _answers(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
