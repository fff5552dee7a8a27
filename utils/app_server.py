"""The app as its users get it: `streamlit run app.py` on a free local port, driven by
Debian's Chromium through Playwright. Shared by the browser tests and bench/memory.py.

Playwright's own browser download cannot work on these machines: the system's `chromium` is
used instead (`make chromium` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_PATH = ROOT / "app.py"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# The page is idle once the script has finished running (as Streamlit's own e2e tests wait).
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
START_TIMEOUT_S = 60


def chromium_executable() -> str | None:
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_app() -> Iterator[tuple[str, subprocess.Popen]]:
    """`streamlit run app.py` offline on a free port: yields its URL and its process.

    Raises:
        TimeoutError: the server did not answer its health check within START_TIMEOUT_S.
    """
    port = free_port()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP_PATH), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"streamlit did not start within {START_TIMEOUT_S} s") from None
                time.sleep(0.5)
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_idle(page, timeout_ms: int = 180_000) -> None:
    """Wait until the script run that the last action started has finished."""
    page.wait_for_timeout(300)  # a rerun triggered by the last action may not have started yet
    page.locator(IDLE).wait_for(timeout=timeout_ms)
