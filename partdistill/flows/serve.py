"""`partdistill serve`: the Prefect UI, and the pipeline as deployments that it can start.

The server is the one at PREFECT_API_URL when that is set and answers; otherwise a healthy server
already listening on 127.0.0.1:PORT; otherwise ``prefect server start --host 127.0.0.1 --port
PORT`` started here in the background (in its own process group, log in PREFECT_HOME) and stopped
again when serving ends. It is bound to 127.0.0.1 only: the UI and API have no authentication.

The deployments, all of the ``partdistill`` flow (``partdistill.flows.pipeline.pipeline_flow``):

- ``partdistill/pipeline``: the whole pipeline;
- ``partdistill/<stage>``: one per stage, and one per round of a stage run in rounds
  (``proposals_r1``, ...): that stage and the stages it reads (``until=<stage>``).

Each takes the flow's parameters, with the served config and store as defaults: ``config``,
``until`` or ``only``, ``cfg_options`` (a list of ``key=value`` overrides) and ``store``.
Runs execute in subprocesses of the serving process, at most ``limit`` at a time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partdistill.flows.settings import apply_prefect_defaults

apply_prefect_defaults()

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
FLOW_NAME = "partdistill"          # the flow's name: deployments are partdistill/<name>
PIPELINE_DEPLOYMENT = "pipeline"


class ServeError(RuntimeError):
    pass


def api_healthy(api_url: str, timeout: float = 3.0) -> bool:
    """Whether a Prefect API answers its health check at ``api_url`` (…/api)."""
    import httpx

    try:
        return httpx.get(api_url.rstrip("/") + "/health", timeout=timeout).status_code == 200
    except (httpx.HTTPError, ValueError):
        return False


def ui_url(api_url: str) -> str:
    """The UI's address for an API address: the server's root (``http://host:port/api`` → ``http://host:port``)."""
    url = api_url.rstrip("/")
    return url[: -len("/api")] if url.endswith("/api") else url


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def _prefect_command() -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


@dataclass
class LocalServer:
    """``prefect server start`` on 127.0.0.1:port, in the background, until ``stop``."""

    port: int
    log_path: Path
    startup_timeout: float = 300.0
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    def start(self) -> LocalServer:
        if _port_in_use(self.port):
            raise ServeError(f"port {self.port} on {HOST} is in use by something that is not a healthy Prefect "
                             f"server; choose another with --port")
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
        # the UI calls the API at PREFECT_UI_API_URL, which otherwise defaults to port 4200 whatever --port says
        env.update(PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(self.port),
                   PREFECT_UI_API_URL=self.api_url)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # its own process group: stop() ends the server and whatever it started, nothing else
            self.process = subprocess.Popen(
                [*_prefect_command(), "server", "start", "--host", HOST, "--port", str(self.port)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while not api_healthy(self.api_url, timeout=2.0):
            if self.process.poll() is not None:
                raise ServeError(f"prefect server exited with code {self.process.returncode} while starting; "
                                 f"its log, {self.log_path}, ends with:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"prefect server did not answer {self.api_url}/health within "
                                 f"{self.startup_timeout:.0f} s; see {self.log_path}")
            time.sleep(0.5)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group, then SIGKILL if it has not exited in ``timeout`` s.
        Stopping a stopped server does nothing."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)  # the group this server leads (start_new_session)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


class _BoundedInterrupt:
    """Ctrl+C stops serving within about ``grace`` seconds, whatever Prefect's runner does on shutdown.

    The first SIGINT raises KeyboardInterrupt, as Python's own handler does, so that Prefect's
    runner and then the server started here shut down cleanly, and it starts a timer. If the
    shutdown has not finished when the timer fires, or at a second Ctrl+C, the servers started
    here are killed and the process exits with 130. Without this, a runner waiting on a busy
    server kept the process, and the server it started, alive for minutes."""

    def __init__(self, grace: float, servers: list[LocalServer], echo: Callable[[str], None]):
        self.grace, self.servers, self.echo = grace, servers, echo
        self.timer: threading.Timer | None = None
        self.previous = None

    def __enter__(self) -> _BoundedInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:  # the clean shutdown finished in time
        if self.timer is not None:
            self.timer.cancel()
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _on_sigint(self, signum, frame) -> None:
        if self.timer is not None:
            self._force_exit("at a second Ctrl+C")
        self.timer = threading.Timer(self.grace, self._force_exit, args=(f"{self.grace:.0f} s after Ctrl+C",))
        self.timer.daemon = True
        self.timer.start()
        raise KeyboardInterrupt

    def _force_exit(self, why: str) -> None:
        self.echo(f"serving had not stopped {why}; killing the server started here and exiting")
        for server in self.servers:
            if server.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.process.pid, signal.SIGKILL)
        os._exit(130)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stage_deployment_names(cfg: dict[str, Any]) -> list[str]:
    """The stages a deployment is made for, in run order: each stage, and each round of a stage
    run in rounds (``proposals``, ``proposals_r1``, ``proposals_r2``, ...)."""
    from partdistill.pipeline import plan

    names: list[str] = []
    for p in plan(cfg):
        for name in (p.stage_name, p.name):
            if name not in names:
                names.append(name)
    return names


def build_deployments(config: str, cfg: dict[str, Any], store: str | None = None,
                      cfg_options: list[str] | None = None) -> list[Any]:
    """RunnerDeployments: ``partdistill/pipeline`` and ``partdistill/<stage>`` for each stage."""
    from prefect.types.entrypoint import EntrypointType

    import partdistill
    from partdistill.flows.pipeline import pipeline_flow

    defaults = {"config": config, "store": store, "cfg_options": list(cfg_options or [])}
    specs = [(PIPELINE_DEPLOYMENT, {}, "The whole pipeline (or pass until= / only= to run part of it); "
                                       "complete stage versions are skipped.")]
    specs += [(name, {"until": name}, f"Stage {name} and the stages it reads (until={name}); complete stage "
                                      "versions are skipped.") for name in stage_deployment_names(cfg)]
    return [
        pipeline_flow.to_deployment(
            name=name, parameters={**defaults, **params}, description=description,
            tags=["partdistill"], version=partdistill.__version__,
            # the runner imports partdistill.flows.pipeline, wherever serve was started from
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for name, params, description in specs
    ]


def run_command_examples(api_url: str, stages: list[str]) -> list[str]:
    """Shell commands that start runs of the served deployments."""
    stage = "features" if "features" in stages else stages[0]
    return [
        f"export PREFECT_API_URL={api_url}",
        f"prefect deployment run '{FLOW_NAME}/{PIPELINE_DEPLOYMENT}' --watch",
        f"prefect deployment run '{FLOW_NAME}/{stage}' -p 'cfg_options=[\"mining.k=6\"]' --watch",
        f"prefect deployment run '{FLOW_NAME}/{PIPELINE_DEPLOYMENT}' -p only=teacher -p store=/path/to/store",
    ]


def _prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def _configured_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return os.environ.get("PREFECT_API_URL") or get_current_settings().api.url


def serve(
    config: str | Path,
    cfg: dict[str, Any],
    store: str | None = None,
    cfg_options: list[str] | None = None,
    port: int = DEFAULT_PORT,
    limit: int | None = 1,
    echo: Callable[[str], None] = print,
    startup_timeout: float = 300.0,
    shutdown_grace: float = 20.0,
) -> None:
    """Serve the pipeline's deployments until interrupted (Ctrl+C or SIGTERM); see the module doc.
    Ctrl+C ends it within ``shutdown_grace`` seconds."""
    import prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if threading.current_thread() is threading.main_thread():
        # until the runner installs its own handler: SIGTERM unwinds, so the server started here stops
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    config = str(Path(config).resolve())
    store = str(Path(store).resolve()) if store is not None else None
    started: list[LocalServer] = []
    with ExitStack() as stack:
        stack.enter_context(_BoundedInterrupt(shutdown_grace, started, echo))
        configured = _configured_api_url()
        own = f"http://{HOST}:{port}/api"
        if configured and api_healthy(configured):
            api_url, origin = configured, "the server at PREFECT_API_URL"
        else:
            if configured:
                echo(f"PREFECT_API_URL={configured} does not answer; using a local server instead")
            if api_healthy(own):
                api_url, origin = own, f"the Prefect server already running on {HOST}:{port}"
            else:
                log = _prefect_home() / f"partdistill-server-{port}.log"
                echo(f"starting a Prefect server on {HOST}:{port} (log: {log}) ...")
                start = time.monotonic()
                server = LocalServer(port, log, startup_timeout)
                stack.callback(server.stop)
                started.append(server)
                server.start()
                api_url = server.api_url
                origin = f"a Prefect server started here in {time.monotonic() - start:.0f} s, stopped on exit"
        # for this process's Prefect client and for the flow runs it starts (subprocesses)
        os.environ["PREFECT_API_URL"] = api_url
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))

        deployments = build_deployments(config, cfg, store, cfg_options)
        stages = [d.name for d in deployments[1:]]
        ui = ui_url(api_url)
        echo(f"Prefect UI: {ui}  (API {api_url}: {origin})")
        echo(f"deployments: {FLOW_NAME}/{PIPELINE_DEPLOYMENT} and {FLOW_NAME}/<stage> for "
             f"{', '.join(stages)}")
        echo(f"defaults: config={config} store={store or '(the config runtime.store)'}"
             + (f" cfg_options={list(cfg_options)}" if cfg_options else ""))
        echo(f"start a run in the UI: {ui}/deployments, pick a deployment, Run > Custom run "
             f"(parameters: config, until/only, cfg_options, store); or from a shell:")
        for line in run_command_examples(api_url, stages):
            echo(f"  {line}")
        echo(f"{'at most ' + str(limit) if limit else 'any number of'} run(s) at a time; Ctrl+C stops serving"
             + (" and the server started here" if "started here" in origin else ""))
        # the deployments have no schedules: nothing to pause on shutdown (13 API calls saved)
        prefect.serve(*deployments, limit=limit, print_starting_message=False, pause_on_shutdown=False)
