"""Two CPU processes on 127.0.0.1 (2 devices each, gloo collectives) train like one 4-device process,
each feeding only its half of every batch, resume from the orbax checkpoint they wrote together, and
sample with sampling.generate from parameters spread over both.

The processes run tests/multihost_worker.py; the checkpoint is written on data:2,fsdp:2 and resumed on fsdp:4.
"""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multihost_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)


def start_pair(tmp: Path, name: str, common: list[str]) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{free_port()}"
    return [start([*common, "--devices=2", f"--out={tmp / f'{name}{i}.json'}", f"--coordinator_address={address}",
                   "--num_processes=2", f"--process_id={i}"], tmp / f"{name}{i}.log") for i in range(2)]


def finish(procs: list[subprocess.Popen], tmp: Path, timeout: float = 300) -> None:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(tmp.glob("*.log")))
    assert all(p.returncode == 0 for p in procs), logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    ckpt = f"--ckpt={tmp / 'ckpt'}"
    first = start_pair(tmp, "first", ["--mesh=data:2,fsdp:2", "--start=0", "--stop=2", "--save", ckpt])
    single = start(["--devices=4", "--mesh=data:2,fsdp:2", "--start=0", "--stop=4", "--sample",
                    f"--ckpt={tmp / 'unused'}",
                    f"--out={tmp / 'single.json'}"], tmp / "single.log")
    finish([*first, single], tmp)
    resumed = start_pair(tmp, "resumed", ["--mesh=fsdp:4", "--start=2", "--stop=4", "--sample", ckpt])
    finish(resumed, tmp)
    return tmp


def load(tmp: Path, name: str) -> dict:
    return json.loads((tmp / f"{name}.json").read_text())


def rows_read(tmp: Path, name: str) -> str:
    return re.search(r"rows (\d+:\d+)", (tmp / f"{name}.log").read_text()).group(1)


def test_two_processes_match_one_process_with_four_devices(runs):
    two, one = load(runs, "first0"), load(runs, "single")
    assert (two["process_count"], two["device_count"]) == (2, 4)
    assert (one["process_count"], one["device_count"]) == (1, 4)
    assert len(two["losses"]) == 2 and len(one["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(two["losses"], one["losses"][:2])) < 1e-5


def test_each_process_reads_only_its_half_of_the_batch(runs):
    assert [rows_read(runs, f"first{i}") for i in range(2)] == ["0:4", "4:8"]
    assert [rows_read(runs, f"resumed{i}") for i in range(2)] == ["0:4", "4:8"]
    assert rows_read(runs, "single") == "0:8"


def test_only_process_zero_writes(runs):
    assert (runs / "first0.json").exists() and not (runs / "first1.json").exists()
    assert (runs / "resumed0.json").exists() and not (runs / "resumed1.json").exists()


def test_resume_on_another_mesh_continues_the_same_run(runs):
    resumed, one = load(runs, "resumed0"), load(runs, "single")
    assert resumed["step"] == one["step"] == 4
    assert resumed["wte_spec"] == "P(None, 'fsdp')"
    assert max(abs(a - b) for a, b in zip(resumed["losses"], one["losses"][2:])) < 1e-5
    assert max(abs(a - b) for a, b in zip(resumed["wte_row"], one["wte_row"])) < 1e-5


def test_sampling_on_params_spread_over_two_processes(runs):
    resumed, one = load(runs, "resumed0"), load(runs, "single")
    assert [len(row) for row in one["tokens"]] == [6, 6]
    assert resumed["tokens"] == one["tokens"]  # greedy (top_k=1) sampling.generate, 2 processes vs 1
