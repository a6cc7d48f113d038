"""The `protege` command line: one Typer app; each verb parses its flags and calls a stage.

Global options (`--home`, `--db`, `--prices`) resolve into `Settings` (config.py). User
mistakes raise `ProtegeError`, printed as one line with exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..config import Settings
from ..errors import ProtegeError
from .bench import bench_cmd
from .common import console, err, exit_on_lost_traces, print_json, settings
from .dataset import dataset_app
from .decide import decide_cmd
from .deploy import deploy_cmd, deployments_app, monitor_cmd, rollback_cmd
from .export import export_cmd
from .flywheel import rebase_cmd, retrain_cmd
from .serve import route_app, serve_cmd
from .traces import traces_app
from .train import curve_cmd, runs_app, train_cmd
from .ui import ui_cmd

app = typer.Typer(help="protege: turn frontier-model traces into a small specialist, and decide whether to train.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(traces_app, name="traces")
app.add_typer(dataset_app, name="dataset")
app.command("bench")(bench_cmd)
app.command("train")(train_cmd)
app.command("curve")(curve_cmd)
app.command("decide")(decide_cmd)
app.command("serve")(serve_cmd)
app.command("export")(export_cmd)
app.command("deploy")(deploy_cmd)
app.command("rollback")(rollback_cmd)
app.command("monitor")(monitor_cmd)
app.command("retrain")(retrain_cmd)
app.command("rebase")(rebase_cmd)
app.command("ui")(ui_cmd)
app.add_typer(deployments_app, name="deployments")
app.add_typer(route_app, name="route")
app.add_typer(runs_app, name="runs")


@app.callback()
def main_options(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(None, "--home", envvar="PROTEGE_HOME",
                                        help="State folder (store, datasets, runs, spool). Default ./.protege"),
    db: Optional[str] = typer.Option(None, "--db", envvar="PROTEGE_DATABASE_URL",
                                     help="Store URL: sqlite:///PATH or postgresql://USER@HOST/DB. Default: SQLite in --home"),
    prices: Optional[Path] = typer.Option(None, "--prices", envvar="PROTEGE_PRICES",
                                          help="Your own API price table (CSV, same columns as `protege prices`)."),
):
    ctx.obj = Settings.resolve(home=home, db=db, prices=prices)


@app.command("prices")
def prices_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Show the API price table used for every cost figure (USD per 1M tokens, with its date)."""
    from ..prices import load_prices

    table = load_prices(settings(ctx).prices_path)
    if as_json:
        print_json({"path": table.path, "prices": [p.__dict__ for p in table.prices]})
        return
    t = Table(title=f"API prices, USD per 1M tokens ({table.path})")
    for col in ("provider", "model", "input", "cached input", "output", "as of", "source"):
        t.add_column(col, overflow="fold")
    for p in table.prices:
        t.add_row(p.provider, p.model, f"{p.input_usd_per_1m:g}",
                  "—" if p.cached_input_usd_per_1m is None else f"{p.cached_input_usd_per_1m:g}",
                  f"{p.output_usd_per_1m:g}", p.as_of, p.source)
    console.print(t)


@app.command("proxy")
def proxy_cmd(
    ctx: typer.Context,
    upstream: str = typer.Option(..., "--upstream", help="API base URL, e.g. https://api.openai.com/v1"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8787, "--port", min=0, max=65535, help="Port to listen on (0: any free port)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for upstream bytes before a 504."),
):
    """Run the logging proxy: point your OpenAI client's base_url at http://HOST:PORT/v1."""
    from ..capture.proxy import build_proxy, run_proxy

    if not upstream.startswith(("http://", "https://")):
        raise ProtegeError(f"--upstream must be an http(s) URL such as https://api.openai.com/v1, got {upstream!r}")
    s = settings(ctx)
    proxy = build_proxy(s, upstream, timeout_s=timeout)
    err.print(f"protege proxy on http://{host}:{port}/v1 → {proxy.upstream}  (traces: {s.home})", highlight=False)
    run_proxy(proxy, host=host, port=port)
    exit_on_lost_traces(proxy.writer)


ARGV: list[str] = []
"""The arguments of this invocation (`--nproc` relaunches the same command under torchrun)."""


def main(argv: list[str] | None = None) -> None:
    ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=argv, prog_name="protege", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(N) comes back as a return value here
            sys.exit(code)
    except ProtegeError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(1)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", None)
        sys.exit(code if code is not None else getattr(exc, "code", 0))
    except Exception as exc:
        # usage errors (bad flag values) from click, or from the click that typer vendors
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
