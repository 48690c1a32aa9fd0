"""The local launcher, i.e. the main job (``dist-llm-train train``, what ``make train`` runs).

It starts one controller and N worker processes of this same CLI on loopback only (the controller binds
``tcp://127.0.0.1`` on a free port), secure by default: CurveZMQ keys for the controller and every worker
are generated into ``RUN_DIR/keys`` and the controller admits exactly those workers. Workers get the
speeds of ``cluster.speeds`` (``--speed``: slower workers wait after each computation, emulating
heterogeneous hardware on one machine) and the last ``cluster.byzantine`` of them run ``cluster.attack``.
Each process runs one torch thread, so N workers share the machine's cores fairly.

While the run goes on it shows live progress (server step, validation loss, tokens/s, acceptance,
staleness, bytes on the wire) read from ``RUN_DIR/metrics.jsonl``; at the end a summary. Every child runs
in its own process group and is killed with its group when the launcher stops for any reason; on Linux a
child also gets SIGTERM if the launcher dies without cleaning up. Ctrl-C stops the controller gracefully
(final checkpoint, SHUTDOWN to the workers), then the workers.

Run directory: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/``, ``keys/``,
``roles.json`` (which worker id is which process), ``logs/`` (one log per process), ``controller.json``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dist_llm_train.config import RunConfig, config_to_yaml
from dist_llm_train.errors import ConfigError, UserError
from dist_llm_train.runtime.metrics import staleness_percentiles, summarize_run
from dist_llm_train.runtime.security import generate_keys, load_public_key, worker_id_from_key
from dist_llm_train.runtime.state import has_checkpoint

__all__ = ["LaunchOptions", "LaunchResult", "default_speeds", "free_port", "launch"]

DEFAULT_SPEEDS = (1.0, 1.0, 0.5, 0.25)
"""The heterogeneous profile of the default run: two full-speed workers, one at half, one at a quarter."""


def default_speeds(n: int) -> list[float]:
    """``cluster.speeds`` when unset: :data:`DEFAULT_SPEEDS` repeated to ``n`` workers."""
    return [DEFAULT_SPEEDS[i % len(DEFAULT_SPEEDS)] for i in range(n)]


@dataclass
class LaunchOptions:
    """Options of the main job (the ``train`` command's flags).

    ``run_dir``: where everything goes (default ``training.run_dir``, else ``runs/<name>-<time>``).
    ``resume``: continue the run in ``run_dir`` from its latest checkpoint (keys and worker ids are kept).
    ``insecure``: plaintext sockets (still loopback only). ``metrics_port``: Prometheus endpoint of the
    controller. ``time_limit_s``: stop training after this long (with a checkpoint), whatever the step.
    ``pull_codec``: see :data:`~dist_llm_train.runtime.controller.PULL_CODECS`. ``start_timeout_s``: how
    long the controller may take to come up (data preparation included). ``worker_args``: extra
    arguments for every worker process (e.g. ``["--timeout", "5"]``).
    """

    run_dir: Path | None = None
    resume: bool = False
    insecure: bool = False
    metrics_port: int | None = None
    time_limit_s: float | None = None
    pull_codec: str = "none"
    start_timeout_s: float = 180.0
    worker_args: list[str] = field(default_factory=list)
    controller_args: list[str] = field(default_factory=list)
    python: str = sys.executable


@dataclass
class LaunchResult:
    run_dir: Path
    wall_s: float
    summary: dict[str, Any]
    exit_codes: dict[str, int | None]


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    reported: bool = False


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when the launcher dies, so a
    # launcher killed with SIGKILL leaves no orphans behind.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(name: str, argv: Sequence[str], log_path: Path, env: dict[str, str]) -> _Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: killed as a whole, never by the terminal's ^C
        preexec_fn=_die_with_parent,  # safe: the launcher starts no threads of its own
    )
    return _Child(name, process, log)


def _kill_group(child: _Child, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, sig)


def _stop_children(children: Sequence[_Child], grace_s: float) -> None:
    """SIGTERM every group, wait up to ``grace_s``, then SIGKILL what is left."""
    for child in children:
        if child.process.poll() is None:
            _kill_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        remaining = max(0.0, deadline - time.monotonic())
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=remaining)
    for child in children:
        # Also the group of an exited leader: grandchildren must not survive.
        _kill_group(child, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=5.0)
        child.log.close()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class _MetricsTail:
    """Reads the complete lines appended to ``metrics.jsonl`` since the last call."""

    def __init__(self, path: Path, *, from_end: bool = False) -> None:
        self.path = path
        # A resumed run appends to its file: show only what this session adds.
        self._offset = path.stat().st_size if from_end and path.is_file() else 0
        self._partial = b""

    def records(self) -> Iterator[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except OSError:
            return
        self._offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        for line in complete:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    yield record


class _Terminate(Exception):
    """SIGTERM (or SIGHUP) to the launcher: clean up as for Ctrl-C."""


def _raise_terminate(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise _Terminate()


def _prepare_keys(run_dir: Path, n_workers: int) -> tuple[Path, Path, list[Path]]:
    keys = run_dir / "keys"
    allow = keys / "allow"
    secrets = []
    if not (keys / "controller.key_secret").is_file():
        generate_keys(keys, "controller")
    allow.mkdir(parents=True, exist_ok=True)
    for i in range(n_workers):
        name = f"worker-{i}"
        if not (keys / f"{name}.key_secret").is_file():
            generate_keys(keys, name)
        shutil.copy(keys / f"{name}.key", allow / f"{name}.key")
        secrets.append(keys / f"{name}.key_secret")
    return keys, allow, secrets


def _progress_line(state: dict[str, Any]) -> str:
    parts = []
    if state.get("val_loss") is not None:
        parts.append(f"val {state['val_loss']:.3f}")
    if state.get("tokens_per_s") is not None:
        parts.append(f"{state['tokens_per_s']:,.0f} tok/s")
    if state.get("acceptance") is not None:
        parts.append(f"accepted {100 * state['acceptance']:.1f}%")
    if state.get("staleness") is not None:
        st = state["staleness"]
        if st.get("p50") is not None:
            parts.append(f"staleness p50 {st['p50']:.0f} p90 {st['p90']:.0f}")
    if state.get("bytes_up") is not None:
        parts.append(f"wire up {state['bytes_up'] / 1e6:.1f} MB down {state['bytes_down'] / 1e6:.1f} MB")
    if state.get("workers") is not None:
        parts.append(f"{state['workers']} workers")
    return "  ".join(parts)


def launch(
    cfg: RunConfig,
    options: LaunchOptions,
    *,
    console: Console | None = None,
    on_start: Callable[[Path, str], None] | None = None,
) -> LaunchResult:
    """Run the distributed job on this machine; returns the run directory, wall time and summary.

    Raises :class:`UserError` when the controller fails to start or exits with an error (its log tail is
    in the message), and re-raises ``KeyboardInterrupt`` after a graceful stop.
    """
    console = console or Console(stderr=True)
    started = time.perf_counter()
    cc = cfg.cluster
    n = cc.workers
    speeds = list(cc.speeds) if cc.speeds is not None else default_speeds(n)
    if cc.byzantine and cc.attack is None:
        raise ConfigError(
            f"cluster.byzantine={cc.byzantine} needs cluster.attack (e.g. --set cluster.attack=sign-flip)"
        )
    if options.run_dir is not None:
        run_dir = Path(options.run_dir)
    elif cfg.training.run_dir:
        run_dir = Path(cfg.training.run_dir)
    else:
        from dist_llm_train.training.trainer import default_run_dir

        run_dir = default_run_dir(cfg)
    if options.resume and not has_checkpoint(run_dir):
        raise UserError(f"--resume: {run_dir} holds no checkpoint (checkpoints/latest is missing)")
    if not options.resume and has_checkpoint(run_dir):
        raise UserError(
            f"run directory {run_dir} already holds a checkpoint: pass --resume to continue it, or choose "
            "another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(config_to_yaml(cfg), encoding="utf-8")
    (run_dir / "controller.json").unlink(missing_ok=True)
    logs = run_dir / "logs"

    env = dict(os.environ)
    # One thread per process: N workers + the controller share the cores instead of oversubscribing them.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cli = [options.python, "-m", "dist_llm_train.cli"]
    # Loopback only. The port is chosen here so that the workers can start (and import torch) while the
    # controller prepares the data, instead of after it.
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    controller_argv = [
        *cli,
        "controller",
        "--config",
        str(config_path),
        "--bind",
        endpoint,
        "--run-dir",
        str(run_dir),
        "--pull-codec",
        options.pull_codec,
        *options.controller_args,
    ]
    security: list[list[str]] = [[] for _ in range(n)]
    roles: dict[str, dict[str, Any]] = {}
    n_byz = cc.byzantine
    if options.insecure:
        controller_argv.append("--insecure")
        security = [["--insecure"] for _ in range(n)]
    else:
        keys, allow, secrets = _prepare_keys(run_dir, n)
        controller_argv += ["--keys", str(keys), "--allow", str(allow)]
        for i, secret in enumerate(secrets):
            security[i] = ["--keys", str(secret), "--server-key", str(keys / "controller.key")]
            worker_id = worker_id_from_key(load_public_key(keys / f"worker-{i}.key"))
            roles[worker_id] = {
                "name": f"worker-{i}",
                "role": "byzantine" if i >= n - n_byz else "honest",
                "speed": speeds[i],
                "attack": cc.attack if i >= n - n_byz else None,
            }
        (run_dir / "roles.json").write_text(json.dumps(roles, indent=2), encoding="utf-8")
        controller_argv += ["--roles", str(run_dir / "roles.json")]
    if options.resume:
        controller_argv.append("--resume")
    metrics_port = options.metrics_port if options.metrics_port is not None else cfg.telemetry.metrics_port
    if metrics_port is not None:
        controller_argv += ["--metrics-port", str(metrics_port)]
    if options.time_limit_s is not None:
        controller_argv += ["--time-limit", str(options.time_limit_s)]

    tail = _MetricsTail(run_dir / "metrics.jsonl", from_end=options.resume)
    children: list[_Child] = []
    previous = (
        {sig: signal.signal(sig, _raise_terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
        if _in_main_thread()
        else {}
    )
    try:
        controller = _spawn("controller", controller_argv, logs / "controller.log", env)
        children.append(controller)
        for i in range(n):
            argv = [
                *cli,
                "worker",
                "--controller",
                endpoint,
                "--name",
                f"worker-{i}",
                "--speed",
                str(speeds[i]),
                "--threads",
                "1",
                *security[i],
                *options.worker_args,
            ]
            if i >= n - n_byz:
                assert cc.attack is not None
                argv += ["--byzantine", cc.attack]
                if cc.attack_params:
                    argv += ["--attack-params", json.dumps(cc.attack_params)]
            children.append(_spawn(f"worker-{i}", argv, logs / f"worker-{i}.log", env))
        _await_endpoint(run_dir, controller, logs / "controller.log", options.start_timeout_s)
        console.print(
            f"[bold]controller[/] on {endpoint} ({'INSECURE' if options.insecure else 'CurveZMQ'}), run dir {run_dir}",
            highlight=False,
        )
        if on_start is not None:
            on_start(run_dir, endpoint)
        byz_note = f", last {n_byz} Byzantine ({cc.attack})" if n_byz else ""
        console.print(
            f"{n} workers, speeds {', '.join(f'{s:g}' for s in speeds)}{byz_note}; {cfg.sync.mode} mode, "
            f"codec {cfg.compression.codec}, aggregator {cfg.aggregation.rule}"
            + (f" (f={cfg.aggregation.f})" if cfg.aggregation.f else ""),
            highlight=False,
        )
        code = _monitor(cfg, run_dir, controller, children[1:], console, tail)
        if code != 0:
            raise UserError(
                f"the controller exited with code {code}; last lines of {logs / 'controller.log'}:\n"
                + _tail(logs / "controller.log")
            )
        # The workers got SHUTDOWN; give them a moment to exit by themselves.
        deadline = time.monotonic() + 10.0
        for child in children[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except (KeyboardInterrupt, _Terminate):
        console.print("stopping: the controller writes a final checkpoint, then the workers stop")
        if children:
            _kill_group(children[0], signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                children[0].process.wait(timeout=60.0)
        _stop_children(children, grace_s=5.0)
        raise KeyboardInterrupt from None
    finally:
        _stop_children(children, grace_s=5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = summarize_run(run_dir)
    return LaunchResult(
        run_dir=run_dir,
        wall_s=time.perf_counter() - started,
        summary=summary,
        exit_codes={c.name: c.process.returncode for c in children},
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _await_endpoint(run_dir: Path, controller: _Child, log_path: Path, timeout_s: float) -> str:
    path = run_dir / "controller.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                return str(json.loads(path.read_text(encoding="utf-8"))["endpoint"])
        code = controller.process.poll()
        if code is not None:
            raise UserError(f"the controller exited with code {code} before serving:\n{_tail(log_path)}")
        time.sleep(0.1)  # UI-side wait for a child process; not a synchronisation in the system itself
    raise UserError(f"the controller did not start within {timeout_s:.0f} s; see {log_path}")


def _monitor(
    cfg: RunConfig,
    run_dir: Path,
    controller: _Child,
    workers: Sequence[_Child],
    console: Console,
    tail: _MetricsTail,
) -> int:
    """Show progress until the controller exits; returns its exit code."""
    state: dict[str, Any] = {}
    max_steps = cfg.training.max_steps
    progress = Progress(
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not cfg.telemetry.progress,
        transient=False,
    )
    with progress:
        task = progress.add_task("train", total=max_steps, completed=0, info="starting")
        while True:
            for record in tail.records():
                event = record.get("event")
                if event == "eval":
                    state["val_loss"] = record.get("val_loss")
                    progress.console.print(
                        f"step {record.get('step')}: validation loss {record.get('val_loss'):.4f}  "
                        + _progress_line({k: v for k, v in state.items() if k != "val_loss"}),
                        highlight=False,
                    )
                elif event == "step":
                    state.update(
                        step=record.get("step"),
                        tokens_per_s=record.get("tokens_per_s"),
                        acceptance=record.get("acceptance_rate"),
                        bytes_up=record.get("bytes_up"),
                        bytes_down=record.get("bytes_down"),
                        workers=record.get("workers"),
                    )
                elif event == "stats":
                    coord = record.get("coordinator", {})
                    state.update(
                        step=record.get("version"),
                        staleness=staleness_percentiles(coord.get("staleness", {})),
                        bytes_up=record.get("bytes_up"),
                        bytes_down=record.get("bytes_down"),
                        workers=record.get("workers_registered"),
                        acceptance=coord.get("acceptance_rate"),
                    )
                elif event == "resume":
                    state["step"] = record.get("step")
                elif event == "evict":
                    progress.console.print(
                        f"worker {record.get('worker_id')} removed ({record.get('reason')}), "
                        f"{record.get('requeued')} task(s) requeued",
                        highlight=False,
                    )
            progress.update(
                task, completed=min(int(state.get("step") or 0), max_steps), info=_progress_line(state)
            )
            for child in workers:
                code = child.process.poll()
                if code not in (None, 0) and not child.reported and controller.process.poll() is None:
                    child.reported = True
                    progress.console.print(f"{child.name} exited with code {code}; see {child.log.name}")
            if (
                workers
                and all(c.process.poll() not in (None, 0) for c in workers)
                and controller.process.poll() is None
            ):
                # Nobody left to train: stop the controller (it checkpoints) and say why.
                _kill_group(controller, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    controller.process.wait(timeout=60.0)
                raise UserError(
                    f"every worker exited with an error; last lines of {workers[0].log.name}:\n"
                    + _tail(Path(workers[0].log.name))
                )
            code = controller.process.poll()
            if code is not None:
                for record in tail.records():
                    if record.get("event") == "eval":
                        state["val_loss"] = record.get("val_loss")
                    if record.get("event") == "summary":
                        state["step"] = record.get("steps")
                progress.update(
                    task, completed=min(int(state.get("step") or 0), max_steps), info=_progress_line(state)
                )
                return code
            time.sleep(0.5)  # display refresh
