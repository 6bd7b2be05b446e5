"""`eigenpatch serve` never leaves vLLM behind: a second signal escalates, a killed launcher takes
the server with it, and a vLLM process that dies ends the launcher with a non-zero exit and one line.

Each case kills its server, so each starts one (eager). The signal cases run the model in vLLM's
engine process (``IN_PROCESS_WORKER``: one Python start fewer; the API server, in its own session,
is what a lost signal used to orphan); the dead-worker case keeps vLLM's own topology.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from vllm_server import IN_PROCESS_WORKER, free_port, tiny_config

import eigenpatch

pytest.importorskip("vllm", reason="serving tests need the serve-cpu extra")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    return eigenpatch.save(model, tmp_path_factory.mktemp("faults") / "tiny", tokenizer=tiny_tokenizer)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (zombies are dead)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _gone_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _group(pgid):
            return True
        time.sleep(0.5)
    return False


class Launcher:
    """`eigenpatch serve` as a user runs it, ready to be signalled."""

    def __init__(self, folder: Path, log: Path, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "eigenpatch.cli", "serve", str(folder), "--port", str(free_port())]
        cmd += ["--enforce-eager", "--max-model-len", "256"]
        self.log = log
        with open(log, "wb") as out:  # a file, not a pipe: vLLM's log would fill a pipe nobody reads
            self.process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        deadline = time.monotonic() + 300
        while not any(line.startswith("serving ") for line in self.lines()):  # printed once healthy
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.5)
        (self.server,) = _children(self.process.pid)  # vLLM's API server, leader of its own group
        assert os.getpgid(self.server) == self.server

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def cleanup(self) -> None:
        for pid in (self.process.pid, -self.server):  # whatever is left, after a failed test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def launcher(checkpoint, tmp_path, request):
    """A healthy `eigenpatch serve`; ``@pytest.mark.parametrize("launcher", [env], indirect=True)``
    starts it with that environment."""
    started = Launcher(checkpoint, tmp_path / "serve.log", getattr(request, "param", None))
    yield started
    started.cleanup()


in_process_worker = pytest.mark.parametrize("launcher", [IN_PROCESS_WORKER], indirect=True, ids=["in-process"])


@in_process_worker
def test_a_second_sigterm_escalates_instead_of_orphaning_the_server(launcher):
    launcher.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the launcher is now waiting for vLLM to shut down
    launcher.process.send_signal(signal.SIGTERM)
    assert launcher.process.wait(30) != 0
    assert _gone_within(launcher.server, 30), f"vLLM processes left: {_group(launcher.server)}"


@in_process_worker
def test_a_killed_launcher_takes_the_server_with_it(launcher):
    launcher.process.send_signal(signal.SIGKILL)
    launcher.process.wait(10)
    assert _gone_within(launcher.server, 30), f"vLLM processes left: {_group(launcher.server)}"


def test_a_dead_vllm_worker_ends_the_launcher_with_one_line(launcher):
    workers = [p for p in _group(launcher.server) if p != launcher.server]
    engine = [p for p in workers if b"VLLM::Worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
    victim = (engine or workers)[0]
    os.kill(victim, signal.SIGKILL)
    assert launcher.process.wait(60) == 1
    # vLLM's last words may lack a newline, so the launcher's line can start mid-line in the shared log
    errors = [line[line.index("eigenpatch: error") :] for line in launcher.lines() if "eigenpatch: error" in line]
    assert len(errors) == 1 and "stopped on its own" in errors[0], errors
    assert _gone_within(launcher.server, 30), f"vLLM processes left: {_group(launcher.server)}"
