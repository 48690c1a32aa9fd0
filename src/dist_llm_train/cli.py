"""Command-line interface: a thin layer that parses options and calls the library.

Every :class:`~dist_llm_train.errors.UserError` becomes one ``error: ...`` line on stderr and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

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
def train(
    config: str | None,
    overrides: tuple[str, ...],
    resume: bool,
    run_dir: str | None,
    device: str | None,
    max_steps: int | None,
) -> None:
    """Train a model (single process; the baseline every distributed run is compared with)."""
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
