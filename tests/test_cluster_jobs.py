"""The precompute job under ``ray job submit`` on a real two-node Ray cluster on this machine.

The cluster is started with the Ray CLI as the README shows it: a head node with the dashboard
(the Jobs API lives there) and a second node with its own raylet and temp dir, on loopback
(Ray itself advertises the machine's address for ``127.0.0.1``; every node is local either way).

It must not touch any other Ray on the machine: the suite's own ``ray.init`` or other people's.
So it has its own ports and temp dirs (the default ``/tmp/ray/ray_current_cluster``, which a
plain ``ray.init()`` reads, is never written), and its own token: Ray >= 2.52 authenticates
every node and client with a shared token, and ``~/.ray/auth_token`` belongs to the user. Nodes
run under ``ray start --block``, so that SIGTERM to those two commands stops exactly their
processes; ``ray stop`` would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from ports import free_port

from pipeline.refer import load_refer
from pipeline.shards import sample_key

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project's environment: `ray`, and the `python` jobs run with
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300


@dataclass
class LocalCluster:
    """A running cluster: where to reach it, and the environment its clients need (the token)."""

    gcs: str
    dashboard: str
    env: dict[str, str]
    token: str

    def submit(self, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
        """``ray job submit`` of this repository, waiting for the job's end (its logs are the stdout)."""
        command = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", ".",
                   "--submission-id", submission_id, "--", *entrypoint]
        return subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)

    def get(self, path: str) -> dict:
        """GET on the dashboard's REST API, authenticated like any client."""
        request = urllib.request.Request(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def alive_nodes(self) -> list[dict]:
        nodes = self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return [node for node in nodes if node["state"] == "ALIVE"]


def _start_node(temp_dir: Path, env: dict[str, str], *options: str) -> subprocess.Popen:
    """``ray start --block`` for one node, returned once the node is up (it then writes its address file)."""
    command = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
               "--num-cpus", "1", "--num-gpus", "0", "--dashboard-agent-listen-port", str(free_port()), *options]
    log = temp_dir.with_suffix(".log")
    with open(log, "w") as stream:
        node = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (temp_dir / "ray_current_cluster").exists():
        if node.poll() is not None or time.monotonic() > deadline:
            _stop([node], temp_dir)
            raise RuntimeError(f"{' '.join(command)} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return node


def _stop(nodes: list[subprocess.Popen], base: Path) -> None:
    """SIGTERM each ``ray start --block``, which stops its node's processes; kill what outlives that.

    Leftovers are found by their temp dir, which only this cluster's processes name.
    """
    for node in nodes:
        node.terminate()
    for node in nodes:
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    for process in psutil.process_iter(["cmdline"]):
        if any(str(base) in part for part in process.info["cmdline"] or ()):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # Short and outside pytest's tmp dir: Ray's unix sockets live under it (paths <= 107 bytes).
    base = Path(tempfile.mkdtemp(prefix="svp-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = base / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_start_node(base / "head", env, "--head", "--port", str(port), "--dashboard-port", str(dashboard),
                                 "--include-dashboard=true", "--ray-client-server-port", str(free_port())))
        nodes.append(_start_node(base / "node2", env, "--address", f"127.0.0.1:{port}"))
        running = LocalCluster(gcs=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard}", env=env, token=token)
        _wait_for(lambda: len(running.alive_nodes()) == 2, "two alive nodes")
        yield running
    finally:
        _stop(nodes, base)
        shutil.rmtree(base, ignore_errors=True)


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:  # the dashboard is not serving yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {START_TIMEOUT_S}s")


def _precompute(root: Path, out: Path, *options: str) -> list[str]:
    return ["python", "-m", "jobs.precompute", "--address", "auto", "--refer-root", str(root), "--dataset", "refcoco",
            "--split-by", "unc", "--out", str(out), "--backend", "felzenszwalb", *options]


def test_submitted_job_runs_on_both_nodes_and_accounts_for_every_image(cluster, synth_root, tmp_path):
    out = tmp_path / "shards"
    # One CPU per node and two one-CPU workers: the job can only finish if both nodes take one.
    result = cluster.submit("svp-precompute", *_precompute(synth_root, out, "--workers", "2", "--shard-size", "3"))
    job = cluster.get("/api/jobs/svp-precompute")
    assert result.returncode == 0 and job["status"] == "SUCCEEDED", result.stdout[-3000:] + result.stderr[-3000:]
    assert "time by stage" in result.stdout  # the job's own summary, tailed by `ray job submit`

    manifest = json.loads((out / "manifest.json").read_text())
    refer = load_refer(synth_root, "refcoco", "unc")
    assert manifest["images_total"] == manifest["images_written"] == len(refer.samples)
    assert manifest["images_failed"] == manifest["images_pending"] == 0
    assert sorted(row["key"] for row in pq.read_table(out / "index.parquet").to_pylist()) == sorted(
        sample_key("refcoco", s.image.image_id) for s in refer.samples)
    assert {s["name"] for s in manifest["shards"]} == {p.name for p in out.glob("*.tar")}
    assert sum(s["samples"] for s in manifest["shards"]) == len(refer.samples)
    assert len(json.loads((out / "timing.json").read_text())["per_worker"]) == 2


def test_job_asking_for_gpus_the_cluster_lacks_fails_fast_and_says_why(cluster, synth_root, tmp_path):
    out = tmp_path / "shards"
    started = time.monotonic()
    result = cluster.submit("svp-no-gpus", *_precompute(synth_root, out, "--workers", "2", "--gpus-per-worker", "1"))
    job = cluster.get("/api/jobs/svp-no-gpus")
    assert result.returncode == 1 and job["status"] == "FAILED" and job["driver_exit_code"] == 2, job
    assert "needs 2 GPU, but the Ray cluster has at most 0" in result.stdout
    assert time.monotonic() - started < JOB_TIMEOUT_S / 2, "refused up front, not after waiting for GPUs"
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()
