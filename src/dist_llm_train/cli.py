"""Command-line interface: a thin layer that parses options and calls the library.

Every :class:`~dist_llm_train.errors.UserError` becomes one ``error: ...`` line on stderr and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from dist_llm_train.errors import UserError

console = Console()
err_console = Console(stderr=True)

config_option = click.option(
    "--config", "-c", "config", default=None, help="YAML file or preset name from configs/ (see `presets`)."
)
set_option = click.option(
    "--set",
    "-s",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one config field, e.g. --set training.lr=3e-4 (repeatable).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="dist-llm-train")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Train language models across heterogeneous, unreliable, possibly malicious workers."""
    ctx.obj = {"debug": debug}


def _load(config: str | None, overrides: tuple[str, ...], extra: list[str] | None = None):
    from dist_llm_train.config import load_config

    return load_config(config, [*overrides, *(extra or [])])


@cli.command()
@config_option
@set_option
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its latest checkpoint.")
@click.option("--run-dir", default=None, help="Run directory (metrics, config, checkpoints).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Compute device.")
@click.option("--max-steps", type=int, default=None, help="Shortcut for --set training.max_steps=N.")
def baseline(
    config: str | None,
    overrides: tuple[str, ...],
    resume: bool,
    run_dir: str | None,
    device: str | None,
    max_steps: int | None,
) -> None:
    """Train in one process: the baseline every distributed run is compared with."""
    _run_single_process(config, overrides, resume, run_dir, device, max_steps)


@cli.command()
@config_option
@set_option
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its latest checkpoint.")
@click.option("--run-dir", default=None, help="Run directory (metrics, config, checkpoints, keys, logs).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Compute device.")
@click.option("--max-steps", type=int, default=None, help="Shortcut for --set training.max_steps=N.")
@click.option("--workers", type=int, default=None, help="Worker processes (default cluster.workers; 4).")
@click.option("--insecure", is_flag=True, help="Plaintext sockets instead of CurveZMQ (still loopback only).")
@click.option(
    "--metrics-port", type=int, default=None, help="Serve the controller's Prometheus metrics here."
)
@click.option(
    "--time-limit", type=float, default=None, help="Stop (with a checkpoint) after this many seconds."
)
@click.option(
    "--pull-codec",
    type=click.Choice(["none", "fp16", "bf16", "int8"]),
    default="none",
    show_default=True,
    help="How workers receive parameters: none = full fp32; others compress full pulls or deltas.",
)
def train(
    config: str | None,
    overrides: tuple[str, ...],
    resume: bool,
    run_dir: str | None,
    device: str | None,
    max_steps: int | None,
    workers: int | None,
    insecure: bool,
    metrics_port: int | None,
    time_limit: float | None,
    pull_codec: str,
) -> None:
    """The main job (what `make train` runs): a controller and N worker processes on this machine.

    Without --config it runs the `distributed-default` preset: gpt-tiny on the embedded python-stdlib
    corpus, 4 workers at speeds 1, 1, 0.5, 0.25, adaptive asynchrony, top-k compression with error
    feedback and a robust aggregator. Use `baseline` to train in one process.
    """
    from pathlib import Path

    from dist_llm_train.runtime.launcher import LaunchOptions, launch
    from dist_llm_train.runtime.metrics import render_summary

    if config is None and resume and run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
        config = str(Path(run_dir) / "config.yaml")
    leading = [f"cluster.workers={workers}", "cluster.speeds=null"] if workers is not None else []
    extra = []
    if device is not None:
        extra.append(f"training.device={device}")
    if max_steps is not None:
        extra.append(f"training.max_steps={max_steps}")
    from dist_llm_train.config import load_config

    cfg = load_config(config or "distributed-default", [*leading, *overrides, *extra])
    options = LaunchOptions(
        run_dir=Path(run_dir) if run_dir is not None else None,
        resume=resume,
        insecure=insecure,
        metrics_port=metrics_port,
        time_limit_s=time_limit,
        pull_codec=pull_codec,
    )
    result = launch(cfg, options, console=err_console)
    render_summary(result.summary, console)
    final = result.summary["loss"]["final_val"]
    console.print(
        f"final validation loss: {final:.4f}  ({result.summary['steps']} server steps, "
        f"{result.wall_s:.0f} s wall time, run dir {result.run_dir})"
    )


@cli.command()
@config_option
@set_option
@click.option(
    "--bind", default="tcp://127.0.0.1:5555", show_default=True, help="ZeroMQ endpoint; port 0 = any."
)
@click.option("--keys", "keys_dir", default=None, help="Directory holding controller.key_secret (CurveZMQ).")
@click.option("--allow", "allow_dir", default=None, help="Allow-list: directory of worker public .key files.")
@click.option("--insecure", is_flag=True, help="Plaintext, no authentication (trusted networks only).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --run-dir.")
@click.option("--run-dir", default=None, help="Run directory (metrics, checkpoints, logs).")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, help="Address of the metrics server.")
@click.option(
    "--pull-codec",
    type=click.Choice(["none", "fp16", "bf16", "int8"]),
    default="none",
    show_default=True,
    help="Parameters to workers: none = full fp32; fp16/bf16 = 16-bit full and deltas; int8 = int8 deltas.",
)
@click.option(
    "--time-limit", type=float, default=None, help="Stop (with a checkpoint) after this many seconds."
)
@click.option(
    "--roles", "roles_file", default=None, help="Ground-truth roles.json (experiments: counts only)."
)
@click.option("--poll", "poll_s", type=float, default=0.05, show_default=True, help="Poll timeout (s).")
def controller(
    config: str | None,
    overrides: tuple[str, ...],
    bind: str,
    keys_dir: str | None,
    allow_dir: str | None,
    insecure: bool,
    resume: bool,
    run_dir: str | None,
    metrics_port: int | None,
    metrics_addr: str,
    pull_codec: str,
    time_limit: float | None,
    roles_file: str | None,
    poll_s: float,
) -> None:
    """Run the controller: parameter server, scheduler and failure detector behind a ROUTER socket."""
    from pathlib import Path

    from dist_llm_train.runtime.controller import Controller, ControllerOptions, parse_roles

    if config is None and resume and run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
        config = str(Path(run_dir) / "config.yaml")
    cfg = _load(config, overrides)
    options = ControllerOptions(
        bind=bind,
        run_dir=Path(run_dir) if run_dir is not None else None,
        keys_dir=Path(keys_dir) if keys_dir is not None else None,
        allow_dir=Path(allow_dir) if allow_dir is not None else None,
        insecure=insecure,
        resume=resume,
        metrics_port=metrics_port if metrics_port is not None else cfg.telemetry.metrics_port,
        metrics_addr=metrics_addr,
        pull_codec=pull_codec,
        time_limit_s=time_limit,
        roles=parse_roles(Path(roles_file) if roles_file else None),
        poll_s=poll_s,
    )
    code = Controller(cfg, options).run()
    if code:
        sys.exit(code)


@cli.command()
@click.option(
    "--controller", "endpoint", required=True, help="Controller endpoint, e.g. tcp://10.0.0.1:5555."
)
@click.option("--keys", "keys", default=None, help="This worker's NAME.key_secret (or a directory + --name).")
@click.option("--server-key", default=None, help="The controller's public controller.key.")
@click.option("--insecure", is_flag=True, help="Plaintext, no authentication (trusted networks only).")
@click.option("--name", default=None, help="Label in the controller's logs (default worker-<pid>).")
@click.option("--byzantine", default=None, metavar="ATTACK", help="Experiments: send this attack's updates.")
@click.option("--attack-params", default=None, help="JSON object of attack parameters.")
@click.option("--bandwidth-mbps", type=float, default=None, help="Emulate a link of this many Mbit/s.")
@click.option("--latency-ms", type=float, default=0.0, help="Emulate this one-way latency.")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Relative speed in (0, 1].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option(
    "--timeout", "timeout_s", type=float, default=30.0, show_default=True, help="Reply timeout (s)."
)
@click.option(
    "--give-up-after",
    "give_up_s",
    type=float,
    default=300.0,
    show_default=True,
    help="Exit when no controller answered for this long (s).",
)
@click.option("--max-tasks", type=int, default=None, help="Leave after this many updates.")
@click.option("--cache-dir", default=None, help="Token cache directory on this machine.")
@click.option("--data-path", default=None, help="Corpus path on this machine (when it differs).")
def worker(
    endpoint: str,
    keys: str | None,
    server_key: str | None,
    insecure: bool,
    name: str | None,
    byzantine: str | None,
    attack_params: str | None,
    bandwidth_mbps: float | None,
    latency_ms: float,
    speed: float,
    device: str,
    threads: int,
    timeout_s: float,
    give_up_s: float,
    max_tasks: int | None,
    cache_dir: str | None,
    data_path: str | None,
) -> None:
    """Run a worker: register, then pull parameters, compute updates and push them until SHUTDOWN."""
    import logging
    import os
    from pathlib import Path

    from dist_llm_train.runtime.worker import (
        Worker,
        WorkerOptions,
        attack_params_from_json,
        worker_options_from_key_dir,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    label = name or f"worker-{os.getpid()}"
    options = WorkerOptions(
        controller=endpoint,
        key=worker_options_from_key_dir(Path(keys), label) if keys is not None else None,
        server_key=Path(server_key) if server_key is not None else None,
        insecure=insecure,
        name=label,
        byzantine=byzantine,
        attack_params=attack_params_from_json(attack_params),
        bandwidth_mbps=bandwidth_mbps,
        latency_ms=latency_ms,
        speed=speed,
        device=device,
        threads=threads,
        timeout_s=timeout_s,
        give_up_s=give_up_s,
        max_tasks=max_tasks,
        cache_dir=cache_dir,
        data_path=data_path,
    )
    Worker(options).run()


@cli.command()
@click.argument("run_dir", required=False)
@click.option(
    "--url", default=None, help="A live controller's metrics endpoint, e.g. http://127.0.0.1:9100/metrics."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def metrics(run_dir: str | None, url: str | None, as_json: bool) -> None:
    """Summarise a distributed run: loss, throughput, acceptance, staleness, bytes per worker, Byzantine."""
    import json
    from pathlib import Path

    from dist_llm_train.runtime.metrics import render_summary, summarize_run, summarize_url

    if (run_dir is None) == (url is None):
        raise UserError("metrics needs either RUN_DIR or --url http://HOST:PORT/metrics (one of them)")
    summary = summarize_url(url) if url is not None else summarize_run(Path(run_dir))  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        render_summary(summary, console)


def _run_single_process(
    config: str | None,
    overrides: tuple[str, ...],
    resume: bool,
    run_dir: str | None,
    device: str | None,
    max_steps: int | None,
) -> None:
    from dist_llm_train.training import Trainer

    extra = []
    if run_dir is not None:
        extra.append(f"training.run_dir={run_dir}")
    if device is not None:
        extra.append(f"training.device={device}")
    if max_steps is not None:
        extra.append(f"training.max_steps={max_steps}")
    cfg = _load(config, overrides, extra)
    trainer = Trainer(cfg, resume=resume, console=err_console)
    n_params = trainer.model.num_parameters()
    err_console.print(
        f"[bold]{cfg.model.preset}[/] ({n_params / 1e6:.2f}M parameters) on {cfg.data.corpus} "
        f"({len(trainer.data.train):,} train / {len(trainer.data.val):,} val tokens, "
        f"{cfg.data.tokenizer} tokenizer), device {trainer.device}, run dir {trainer.run_dir}"
    )
    result = trainer.train()
    table = Table(title="training summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.summary().items():
        if value is not None:
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"final validation loss: {result.final_eval.loss:.4f}")


@cli.command()
@config_option
@set_option
@click.option(
    "--topology",
    "-t",
    default=None,
    help="Topology preset (lan, hetero-3tier, multi-region) or YAML file; default: cluster.topology, "
    "else cluster.workers workers on a LAN.",
)
@click.option(
    "--steps", type=int, default=None, help="Server steps to run (shortcut for training.max_steps)."
)
@click.option(
    "--target-loss", type=float, default=None, help="Report the virtual time to this validation loss."
)
@click.option("--keep-going", is_flag=True, help="Continue to --steps after the target loss is reached.")
@click.option("--max-virtual-s", type=float, default=None, help="Stop after this many virtual seconds.")
@click.option(
    "--base-tokens-per-s",
    type=float,
    default=None,
    help="Compute speed of a speed-1.0 worker in tokens/s (default 5000); higher makes links the bottleneck.",
)
@click.option("--bandwidth-mbps", type=float, default=None, help="Override every link's bandwidth (Mbit/s).")
@click.option("--eval-every", type=int, default=None, help="Server steps between validation evaluations.")
@click.option("--seed", type=int, default=None, help="Simulation seed (default: training.seed).")
@click.option("--json", "json_path", default=None, help="Also write the full report as JSON to this path.")
def simulate(
    config: str | None,
    overrides: tuple[str, ...],
    topology: str | None,
    steps: int | None,
    target_loss: float | None,
    keep_going: bool,
    max_virtual_s: float | None,
    base_tokens_per_s: float | None,
    bandwidth_mbps: float | None,
    eval_every: int | None,
    seed: int | None,
    json_path: str | None,
) -> None:
    """Simulate distributed training over a WAN topology on a virtual clock (real model, real gradients)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dist_llm_train.simulation import DEFAULT_BASE_TOKENS_PER_S, SimProgress, Simulation
    from dist_llm_train.simulation.render import summary_table, worker_table

    cfg = _load(config, overrides, [f"training.max_steps={steps}"] if steps is not None else [])
    progress = Progress(
        TextColumn("[bold]simulate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not cfg.telemetry.progress,
    )
    task = progress.add_task("steps", total=cfg.training.max_steps, status="")
    last_loss: list[float] = []

    def on_progress(p: SimProgress) -> None:
        if p.val_loss is not None:
            last_loss[:] = [p.val_loss]
        loss = f", val loss {last_loss[0]:.3f}" if last_loss else ""
        progress.update(task, completed=p.step, status=f"virtual {p.virtual_s:.1f} s{loss}")

    sim = Simulation(
        cfg,
        topology,
        base_tokens_per_s=base_tokens_per_s if base_tokens_per_s is not None else DEFAULT_BASE_TOKENS_PER_S,
        eval_every=eval_every,
        target_loss=target_loss,
        max_virtual_s=max_virtual_s,
        stop_at_target=not keep_going,
        seed=seed,
        bandwidth_mbps=bandwidth_mbps,
        progress=on_progress,
    )
    err_console.print(
        f"[bold]{sim.topology.name}[/]: {len(sim.workers)} workers, {cfg.sync.mode} mode, "
        f"{cfg.model.preset} ({sim.numel / 1e6:.2f}M parameters), codec {cfg.compression.codec}, "
        f"aggregator {cfg.aggregation.rule}"
    )
    with progress:
        report = sim.run()
    console.print(worker_table(report))
    console.print(summary_table(report))
    if json_path is not None:
        console.print(f"report written to {report.to_json(json_path)}")


@cli.command()
@click.option(
    "--preset",
    "preset_name",
    required=True,
    help="gpt2-wikitext, bert-mlm, multi-region, byzantine, shakespeare.",
)
@click.option(
    "--scale",
    type=click.Choice(["small", "full"]),
    default="small",
    show_default=True,
    help="small: minutes on 2 CPU cores; full: sized for a GPU.",
)
@click.option("--out", "out_dir", default=None, help="Output directory (default runs/validate/PRESET-SCALE).")
@click.option("--seed", type=int, default=1337, show_default=True, help="Seed of every arm.")
@click.option(
    "--data-dir",
    default=None,
    help="Directory with local corpora (wikitext-2/, tinyshakespeare/); default: download once.",
)
@click.option("--cache-dir", default=None, help="Tokenizer and token-array cache (default data.cache_dir).")
@click.option(
    "--arms", default=None, help="Comma-separated subset of arms to run (e.g. mean/none,krum/zero)."
)
@set_option
@click.option(
    "--reproduce",
    "previous",
    default=None,
    help="An earlier results.json: fail unless this run reproduces it within --tolerance.",
)
@click.option(
    "--tolerance", type=float, default=None, help="Relative tolerance for --reproduce (default 1e-6)."
)
@click.option("--no-plots", is_flag=True, help="Skip the matplotlib plots.")
@click.option(
    "--jobs",
    "-j",
    type=int,
    default=1,
    show_default=True,
    help="Arms run at once in separate processes (same numbers; 2 on a 2-core machine).",
)
def validate(
    preset_name: str,
    scale: str,
    out_dir: str | None,
    seed: int,
    data_dir: str | None,
    cache_dir: str | None,
    arms: str | None,
    overrides: tuple[str, ...],
    previous: str | None,
    tolerance: float | None,
    no_plots: bool,
    jobs: int,
) -> None:
    """Train a preset's baseline and distributed configurations and report them against its criteria."""
    from dist_llm_train.validation import DEFAULT_REL_TOLERANCE, compare_results, load_results, run_validation
    from dist_llm_train.validation.report import summary_rows

    earlier = load_results(previous) if previous is not None else None
    only = [a.strip() for a in arms.split(",") if a.strip()] if arms else None
    out = out_dir or f"runs/validate/{preset_name}-{scale}"
    result = run_validation(
        preset_name,
        scale=scale,  # type: ignore[arg-type]
        out_dir=out,
        seed=seed,
        data_dir=data_dir,
        cache_dir=cache_dir,
        only=only,
        extra_overrides=overrides,
        plots=not no_plots,
        console=err_console,
        jobs=jobs,
    )
    rows = summary_rows(result.arms)
    keep = [0, 2, 3, 4, 7, 8, 9, 10]  # the configuration column is in report.md; the terminal is narrow
    table = Table(title=f"{result.preset} ({result.scale})")
    for i in keep:
        table.add_column(rows[0][i], no_wrap=i == 0)
    for row in rows[1:]:
        table.add_row(*(row[i] for i in keep))
    console.print(table)
    for c in result.criteria:
        verdict = "[green]met[/]" if c.passed else "[red]MISSED[/]"
        value = "-" if c.value is None else f"{c.value:.4g}"
        console.print(f"{verdict}  {c.name}: {value} (target {c.comparison} {c.threshold:g})  {c.detail}")
    for name, error in result.failed.items():
        console.print(f"[red]FAILED[/] arm {name}: {error}")
    console.print(f"report: {Path(out) / 'report.md'}, results: {Path(out) / 'results.json'}")
    if earlier is not None:
        diffs = compare_results(result.to_dict(), earlier, rel_tol=tolerance or DEFAULT_REL_TOLERANCE)
        if diffs:
            for line in diffs[:20]:
                console.print(f"[red]differs[/] {line}")
            raise SystemExit(1)
        console.print(
            f"reproduced {previous} within a relative tolerance of {tolerance or DEFAULT_REL_TOLERANCE:g}"
        )
    if result.failed:
        raise SystemExit(1)


@cli.group()
def config() -> None:
    """Inspect and validate configurations."""


@config.command("show")
@config_option
@set_option
def config_show(config: str | None, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved configuration as YAML."""
    from dist_llm_train.config import config_to_yaml

    click.echo(config_to_yaml(_load(config, overrides)), nl=False)


@config.command("validate")
@click.argument("path")
@set_option
def config_validate(path: str, overrides: tuple[str, ...]) -> None:
    """Check a YAML config (and overrides); exit 0 when valid."""
    _load(path, overrides)
    click.echo(f"{path}: valid")


@cli.command()
def presets() -> None:
    """List the configuration presets in configs/."""
    from dist_llm_train.config import available_presets

    for name in available_presets():
        click.echo(name)


@cli.group()
def keys() -> None:
    """CurveZMQ keys for the controller and the workers.

    \b
    Setting up a secure run:
      1. dist-llm-train keys generate KEYS --name controller   (controller machine)
      2. dist-llm-train keys generate KEYS --name worker-N     (each worker machine)
      3. build the controller's allow-list: a directory holding every worker's PUBLIC
         NAME.key file (copy it; never copy a .key_secret anywhere)
      4. give each worker the controller's public controller.key
    """


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--name",
    default="controller",
    show_default=True,
    help="Key name: controller, or worker-N for a worker.",
)
@click.option("--force", is_flag=True, help="Overwrite existing keys of this name.")
def keys_generate(directory: str, name: str, force: bool) -> None:
    """Write a keypair: DIRECTORY/NAME.key (public) and DIRECTORY/NAME.key_secret (mode 0600)."""
    from dist_llm_train.runtime.security import generate_keys, load_keypair

    public, secret = generate_keys(directory, name, overwrite=force)
    pair = load_keypair(secret)
    click.echo(f"public key: {public}")
    click.echo(f"secret key: {secret} (keep private)")
    if name == "controller":
        click.echo(f"give {public} (public) to every worker: it is how they recognise this controller")
    else:
        click.echo(f"worker id:  {pair.worker_id}")
        click.echo(f"copy {public} into the controller's allow-list directory")


@keys.command("list")
@click.argument("directory", type=click.Path(file_okay=False))
def keys_list(directory: str) -> None:
    """List the public keys in DIRECTORY (e.g. an allow-list) with the worker id each one gets."""
    from pathlib import Path

    from dist_llm_train.runtime.security import load_public_key, worker_id_from_key

    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"key directory {directory!r} not found: pass a directory holding .key files")
    files = sorted(root.glob("*.key"))
    if not files:
        raise UserError(f"{directory!r} holds no public .key files: create some with `keys generate`")
    # Plain lines, not a table: keys are copied and compared by eye, so they must never be folded or cut.
    click.echo("# name  worker-id  public-key(z85)  [secret here]")
    for path in files:
        public = load_public_key(path)
        secret_here = "  secret-here" if path.with_suffix(".key_secret").exists() else ""
        click.echo(f"{path.stem}  {worker_id_from_key(public)}  {public.decode()}{secret_here}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="dist-llm-train", standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


def run() -> None:
    """Console script: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
