"""Start the real ``dagster dev`` (webserver + daemon) for end-to-end tests, and talk GraphQL to it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geofm_assets.paths import REPO_ROOT

LOCATION = "geofm_assets"
REPOSITORY = "__repository__"


class DagsterDevError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DagsterDev:
    url: str
    home: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def graphql(self, query: str, variables: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = json.loads(resp.read())
        if payload.get("errors"):
            raise DagsterDevError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
        """Call ``probe`` until it returns something truthy; fail with the server log otherwise."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DagsterDevError(f"dagster dev exited ({self.process.returncode}) while waiting "
                                      f"for {what}:\n{self.log_tail()}")
            last = probe()
            if last:
                return last
            time.sleep(every)
        raise DagsterDevError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})\n"
                              f"{self.log_tail()}")


def _location_loaded(dev: DagsterDev) -> bool:
    try:
        data = dev.graphql(
            "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
            "locationOrLoadError { __typename ... on PythonError { message } } } } } }", timeout=10)
    except (urllib.error.URLError, ConnectionError, TimeoutError, DagsterDevError):
        return False
    for entry in data["workspaceOrError"].get("locationEntries", []):
        if entry["name"] == LOCATION and entry["loadStatus"] == "LOADED":
            err = entry["locationOrLoadError"]
            if err and err["__typename"] == "PythonError":
                raise DagsterDevError(f"code location failed to load: {err['message']}")
            return True
    return False


@contextmanager
def dagster_dev(home: Path, env: dict[str, str], startup_timeout: float = 180) -> Iterator[DagsterDev]:
    """``dagster dev`` on a free loopback port with ``home`` as DAGSTER_HOME; the whole process
    group is stopped at the end, whatever happens."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    log_path = home / "dagster_dev.log"
    full_env = {**os.environ, **env, "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    dagster = Path(sys.executable).with_name("dagster")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(dagster), "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    dev = DagsterDev(f"http://127.0.0.1:{port}", home, log_path, process)
    try:
        dev.wait_for("the code location to load", lambda: _location_loaded(dev), startup_timeout)
        yield dev
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 20) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
