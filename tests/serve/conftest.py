"""A real server for the tests: `yunque serve` in a subprocess on a free loopback port, with the tiny `base`
model (conftest.py at the top), waited for on /health."""

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

KEY = "test-key"
MODEL = "tiny"


@dataclass
class Server:
    url: str
    """http://127.0.0.1:PORT"""
    proc: subprocess.Popen
    home: Path
    """$YUNQUE_HOME of the server: feedback goes to home/feedback."""
    model_dir: Path

    def get(self, path: str, **kwargs):
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30, **kwargs)

    def post(self, path: str, json=None, headers=None, **kwargs):
        headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
        return httpx.post(self.url + path, json=json, headers=headers, timeout=60, **kwargs)

    def rss(self) -> int:
        """The server process's resident memory, in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def metric(self, name: str, **labels) -> float:
        """The value of one yunque_ metric from /metrics."""
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(f"yunque_{name}{{{want}}} ") or (not want and line.startswith(f"yunque_{name} ")):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"metric yunque_{name}{{{want}}} not found")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, home: Path, *args: str, name: str = MODEL) -> Server:
    """`yunque serve NAME=MODEL_DIR ARGS...`, answering /health."""
    port = free_port()
    env = {**os.environ, "YUNQUE_HOME": str(home), "OMP_NUM_THREADS": "1", "YUNQUE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "yunque", "serve", f"{name}={model_dir}", "--port", str(port),
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(f"http://127.0.0.1:{port}", proc, home, model_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}): {proc.stdout.read()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not answer /health within 120 s")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def server(base, tmp_path_factory):
    """A running `yunque serve` with the tiny model as "tiny", its key KEY, and the model preloaded."""
    s = start_server(base, tmp_path_factory.mktemp("home"), "--preload", "--max-tokens", "256")
    yield s
    stop_server(s)


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
