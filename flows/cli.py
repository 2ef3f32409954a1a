"""The `anole` command line. Heavy modules are imported inside commands so `--help` is instant."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="anole",
    help="Distributed meta-learning for few-shot image recognition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="Store directory (default: $ANOLE_HOME or ./anole-store)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def _offline_env() -> None:
    # These machines have no network: keep Prefect and Ray from phoning home.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _emit(as_json: bool, payload: Any, human: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(payload, indent=2, default=str))
    elif human is not None:
        typer.echo(human)


def _tagged(tag: str, style: str, message: str) -> None:
    """Print `tag: message` on stderr as one line. The message is plain text, never markup:
    a `[/x]` or `:smile:` in a file, domain or path name prints as typed."""
    from rich.text import Text

    _console().print(Text.assemble((f"{tag}:", style), " ", message), soft_wrap=True)


def _fail(message: str) -> None:
    _tagged("error", "bold red", message)
    raise typer.Exit(2)


class _Progress:
    """A rich progress bar driven by `(done, total)` callbacks from pipeline code."""

    def __init__(self, description: str, enabled: bool = True):
        self.description = description
        self.enabled = enabled and sys.stderr.isatty() or os.environ.get("ANOLE_PROGRESS") == "1"
        self._bar = None
        self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=_console(), transient=False,
            )
            self._bar.__enter__()
            from rich.markup import escape

            # the description holds user names (`ingest <source>`): text, not markup
            self._task = self._bar.add_task(escape(self.description), total=None, info="")
        return self

    def __call__(self, done: int, total: int, info: dict[str, float] | None = None) -> None:
        if self._bar is not None:
            text = "  ".join(f"{k}={v:.3g}" for k, v in (info or {}).items() if k in ("loss", "accuracy"))
            self._bar.update(self._task, completed=done, total=total, info=text)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _guard(fn):
    """Turn AnoleError into a one-line message and exit code 2, instead of a traceback; and the
    pipeline's warnings (a checkpoint fallen back from, a torn metrics line) into `warning:` lines."""
    import functools
    import warnings

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.errors import AnoleError

        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_: _tagged("warning", "yellow", str(message))
            try:
                return fn(*args, **kwargs)
            except AnoleError as exc:
                _fail(str(exc))

    return wrapper


# --- data ------------------------------------------------------------------------------------


@app.command()
@_guard
def ingest(
    source: Annotated[Path, typer.Argument(help="A folder or .zip: <alphabet>/<character>/*.png or <domain>/<class>/*.jpg.")],
    domain: Annotated[str | None, typer.Option(help="Name of a single-domain source, or the one domain to take from a multi-domain source.")] = None,
    store: StoreOpt = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Skip unreadable images with a warning instead of failing.")] = False,
    min_images: Annotated[int, typer.Option(help="Warn about classes with fewer images than this.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Ingest an image domain into the Parquet store (idempotent and atomic)."""
    from pipeline.store import Store

    with _Progress(f"ingest {source.name}", enabled=not as_json) as bar:
        report = Store(store).ingest(source, domain, skip_invalid=skip_invalid, min_images=min_images,
                                     progress=bar)
    payload = report.to_dict()
    if as_json:
        _emit(True, payload)
        return
    for w in report.warning_lines():  # the first few and a count: 100k bad files are not 100k lines
        _tagged("warning", "yellow", w)
    for d in payload.get("domains", []):
        typer.echo(
            f"{d['name']:<40} {d['outcome']:<12} {d['num_classes']:>5} classes {d['num_images']:>7} images"
        )


@app.command()
@_guard
def domains(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List ingested domains: classes, images, content hash, version, ingestion time."""
    from pipeline.store import Store

    infos = [d.to_dict() for d in Store(store).domains()]
    if as_json:
        _emit(True, infos)
        return
    if not infos:
        typer.echo("no domains ingested yet; run `anole ingest SOURCE`")
        return
    typer.echo(f"{'domain':<40} {'ver':>3} {'classes':>7} {'images':>7}  {'hash':<12}  ingested")
    for d in infos:
        typer.echo(
            f"{d['name']:<40} {d['version']:>3} {d['num_classes']:>7} {d['num_images']:>7}  "
            f"{d['content_hash'][:12]:<12}  {d['ingested_at']}"
        )


@app.command()
@_guard
def sample(
    out: Annotated[Path, typer.Option(help="Parquet file for the task pool.")],
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    episodes: Annotated[int, typer.Option(help="Number of episodes in the pool.")] = 1000,
    seed: int = 0,
    mode: Annotated[str, typer.Option(help="within (one domain per episode) or unstructured.")] = "within",
    rotations: Annotated[bool, typer.Option("--rotations", help="Rotated copies count as new classes.")] = False,
    domain: Annotated[list[str] | None, typer.Option(help="Restrict to these domains (repeatable).")] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sample a reproducible pool of N-way K-shot episode specs into Parquet."""
    from pipeline.config import SAMPLINGS, OneOf, Range, check_values, rule_of

    # before the store is read (and its decoded-image cache written)
    check_values([
        ("--ways", ways, rule_of("ways")),
        ("--shots", shots, rule_of("shots")),
        ("--queries", queries, rule_of("queries")),
        ("--episodes", episodes, Range(ge=1, lt=2**31)),  # task ids hold the position in 31 bits
        ("--seed", seed, rule_of("seed")),
        ("--mode", mode, OneOf(SAMPLINGS)),
    ])
    from pipeline.store import Store
    from pipeline.tasks import EpisodeSampler

    images = Store(store).load_images(domain or None)
    sampler = EpisodeSampler(images, ways=ways, shots=shots, queries=queries, domains=domain or None,
                             mode=mode, rotations=rotations)
    specs = sampler.sample(episodes, seed=seed)
    specs.write_pool(out)
    _emit(as_json, {"pool": str(out), "episodes": episodes, "ways": ways, "shots": shots,
                    "queries": queries, "seed": seed, "mode": mode, "data_version": images.data_version},
          f"wrote {episodes} {ways}-way {shots}-shot episodes to {out}")


# --- evaluation ------------------------------------------------------------------------------


@app.command()
@_guard
def evaluate(
    runs: Annotated[list[Path] | None, typer.Option("--runs", help="One-shot run folders (runNN/) or a folder of them; repeatable.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint (.pt) or run directory to score.")] = None,
    baseline: Annotated[str, typer.Option(help="Without --checkpoint: mhd (modified Hausdorff) or pixels.")] = "mhd",
    ways: Annotated[int | None, typer.Option(help="Held-out N-way evaluation (needs --checkpoint).")] = None,
    shots: int = 1,
    queries: int = 5,
    episodes: int = 600,
    bn_mode: Annotated[str | None, typer.Option(help="transductive, per_image or support (default: the checkpoint's).")] = None,
    views: Annotated[int | None, typer.Option(help="Test-time views per episode (default: the checkpoint's eval_views; 1: none).")] = None,
    refine_steps: Annotated[int | None, typer.Option(help="ProtoNets: soft k-means prototype refinement steps, transductive mode only (default: the checkpoint's; 0: none).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: the checkpoint's device setting; auto: cuda when available).")] = None,
    seed: int = 0,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a checkpoint or a baseline on Lake's one-shot runs and/or held-out alphabets."""
    from pipeline.config import check_values, rule_of
    from pipeline.errors import ConfigError

    if not runs and ways is None:
        _fail("give --runs DIR (one-shot runs) and/or --ways N with --checkpoint (held-out alphabets)")
    if checkpoint is None and ways is not None:
        _fail("--ways needs --checkpoint: held-out accuracy scores a trained model")
    # every flag before any file is read; each has the range of the config field it stands for
    check_values([
        ("--ways", ways, rule_of("val_ways")),
        ("--shots", shots, rule_of("val_shots")),
        ("--queries", queries, rule_of("queries")),
        ("--episodes", episodes, rule_of("val_episodes")),
        ("--views", views, rule_of("eval_views")),
        ("--refine-steps", refine_steps, rule_of("learner.refine_steps")),
        ("--device", device, rule_of("device")),
        ("--bn-mode", bn_mode, rule_of("bn_mode")),
        ("--seed", seed, rule_of("seed")),
    ])
    from pipeline import scoring

    result: dict[str, Any] = {}
    run_dirs = scoring.find_runs(runs or [])
    if checkpoint is None:
        scores = scoring.score_baseline(run_dirs, baseline)
        result["oneshot"] = scores.to_dict()
        _emit(as_json, result, scores.table())
        return
    model = scoring.load_model(checkpoint)
    if views is not None:
        model.config = model.config.replace(eval_views=views)
    if device is not None:
        model.config = model.config.replace(device=device)
    overrides = model.learner_class.evaluation_overrides  # the learner's evaluation-time knobs
    if refine_steps is not None:
        if "refine_steps" not in overrides:
            raise ConfigError(f"--refine-steps: learner {model.config.learner!r} has no "
                              "refine_steps (only learners with prototype refinement do)")
        model.config = model.config.with_learner(refine_steps=refine_steps)
    result["views"] = model.config.eval_views
    for name in overrides:
        result[name] = getattr(model.config.learner_config, name)
    if run_dirs:
        scores = scoring.score_oneshot(model, run_dirs, bn_mode=bn_mode)
        result["oneshot"] = scores.to_dict()
        if not as_json:
            typer.echo(scores.table())
    if ways is not None:
        from pipeline.store import Store

        acc = scoring.score_heldout(model, Store(store), ways=ways, shots=shots, queries=queries,
                                    episodes=episodes, seed=seed, bn_mode=bn_mode)
        result["heldout"] = acc.to_dict()
        if not as_json:
            typer.echo(f"held-out {model.split_name} alphabets: {acc}")
    if as_json:
        _emit(True, result)


# --- training --------------------------------------------------------------------------------


@app.command()
@_guard
def train(
    learner: Annotated[str | None, typer.Option(help="A registered learner: protonet, reptile, maml or fomaml (default: protonet; --help-config lists each one's fields).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field: key=value, or learner.key=value for the learner's own (repeatable).")] = None,
    minutes: Annotated[float | None, typer.Option(help="Time budget; replaces the step count.")] = None,
    steps: Annotated[int | None, typer.Option(help="Meta-updates to run.")] = None,
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints, metrics, TensorBoard logs.")] = Path("anole-runs/latest"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest good checkpoint in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Clear the run in --out (checkpoints, metrics, logs) and start afresh.")] = False,
    workers: Annotated[int, typer.Option(help="Ray adaptation workers; 0 trains in this process.")] = 0,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray).")] = None,
    store: StoreOpt = None,
    help_config: Annotated[bool, typer.Option("--help-config", help="List every config field and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Meta-train a learner on the store's domains, checkpointing as it goes.

    Ctrl-C or SIGTERM finishes the step in flight, checkpoints it and exits 130 saying how to
    resume; a second Ctrl-C exits at once."""
    from pipeline.config import Range, check_values, config_for, help_text
    from pipeline.errors import ConfigError

    if help_config:
        typer.echo(help_text())
        return
    check_values([("--workers", workers, Range(ge=0)), ("--minutes", minutes, Range(ge=0)),
                  ("--steps", steps, Range(ge=1))])
    if resume and overwrite:
        raise ConfigError(f"--resume continues the run in {out} and --overwrite clears it: give one")
    _offline_env()
    cfg = config_for(learner, config, set_ or [], minutes=minutes, steps=steps)
    again = ["anole", "train", *(["--learner", learner] if learner else []),
             *(["--config", str(config)] if config else []),
             *(x for s in set_ or [] for x in ("--set", s)),
             *(["--minutes", str(minutes)] if minutes is not None else []),
             *(["--steps", str(steps)] if steps is not None else []),
             *(["--store", str(store)] if store else []),
             *(["--workers", str(workers)] if workers else []),
             *(["--ray-address", ray_address] if ray_address else []), "--resume", "--out", str(out)]
    try:
        result = _train(cfg, out, store, resume=resume, overwrite=overwrite, workers=workers,
                        ray_address=ray_address, quiet=as_json)
    except KeyboardInterrupt:
        from pipeline.checkpoint import CheckpointDir

        done = CheckpointDir(out / "checkpoints").steps()
        _interrupted(f"stopped at once; its checkpoints up to step {done[-1]} are intact" if done
                     else "stopped at once, before its first checkpoint", again)
    _emit(as_json, result, _train_summary(result))
    if result.get("interrupted"):
        _interrupted(f"{result['interrupted']}: stopped at step {result['step']} and saved "
                     f"{result['latest_checkpoint']}", again)


def _interrupted(what: str, again: list[str]) -> None:
    """Say how to continue an interrupted training, and exit 130 (the shell's code for Ctrl-C)."""
    import shlex

    _tagged("interrupted", "bold yellow", f"{what}; continue with: {shlex.join(again)}")
    raise typer.Exit(130)


def _train(cfg, out: Path, store: Path | None, *, resume: bool, overwrite: bool, workers: int,
           ray_address: str | None, quiet: bool) -> dict[str, Any]:
    from pipeline.store import Store
    from pipeline.train import clear_run

    images = Store(store).load_images(
        list(cfg.domains) or None, image_size=cfg.image_size, channels=cfg.channels, invert=cfg.invert
    )
    if not images.domains:
        raise typer.BadParameter("the store is empty: run `anole ingest SOURCE` first")
    if overwrite and clear_run(out):  # only now: a bad flag or store above leaves the run as it was
        _tagged("warning", "yellow", f"--overwrite: cleared the earlier run in {out}")
    with _Progress(f"train {cfg.learner}", enabled=not quiet) as bar:
        from pipeline.train import stop_on_signals

        if workers > 0:
            from workers.driver import DistributedTrainer

            trainer = DistributedTrainer(cfg, images, out, workers=workers, address=ray_address,
                                         progress=bar)
        else:
            from pipeline.train import Trainer

            trainer = Trainer(cfg, images, out, progress=bar)

        def stopping(name: str) -> None:
            _tagged("warning", "yellow", f"{name}: finishing the step in flight, then saving a "
                    "checkpoint (press Ctrl-C again to stop at once)")

        with stop_on_signals(trainer, stopping):
            result = trainer.run(resume=resume)
    return result.to_dict()


@app.command("convert-checkpoint")
@_guard
def convert_checkpoint(
    path: Annotated[Path, typer.Argument(help="A checkpoint (.pt or .json), a checkpoints folder or a run folder.")],
    as_json: JsonOpt = False,
) -> None:
    """Re-save a TRUSTED checkpoint from an older anole in the safe form that evaluate and --resume load.

    Loading refuses payloads holding more than tensors and plain data, because unpickling those
    can run code. This command unpickles them in full, so run it only on files you wrote
    yourself or otherwise trust; each payload's sha256 is checked first, and payloads that
    already load safely are left as they are."""
    from pipeline.checkpoint import convert_checkpoint as convert

    converted = convert(path)
    _emit(as_json, {"converted": [str(p) for p in converted]},
          "\n".join(f"converted {p}" for p in converted) or f"{path}: already in the safe form")


def _train_summary(result: dict[str, Any]) -> str:
    best = result.get("best_val")
    best_txt = f"{best:.1%}" if best is not None else "n/a"
    return (
        f"trained {result['step']} steps in {result['seconds']:.0f}s "
        f"({result['tasks_per_second']:.1f} tasks/s); best validation accuracy {best_txt}\n"
        f"best checkpoint: {result['best_checkpoint']}"
    )


# --- the main job ----------------------------------------------------------------------------


@app.command()
@_guard
def run(
    minutes: Annotated[float, typer.Option(help="Meta-training budget in minutes: 75% for the first training, 25% for the retrain on new alphabets.")] = 10.0,
    learner: Annotated[str | None, typer.Option(help="Learner to train (default: protonet).")] = None,
    out: Annotated[Path, typer.Option(help="Workspace: store, task pools, runs, reports, champions.")] = Path("anole-runs/main"),
    workers: Annotated[int | None, typer.Option(help="Ray adaptation workers (default: one per core); 0 trains in this process.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The main job as a Prefect flow: ingest Omniglot, train, evaluate, promote; then a new alphabet arrives and is learned."""
    from flows.mainjob import check_args, run_main_job

    check_args(out, minutes=minutes, learner=learner, workers=workers)  # before any work
    _offline_env()
    with _Progress("anole run", enabled=not as_json) as bar:
        summary = run_main_job(out, minutes=minutes, learner=learner, progress=bar,
                               log=None if as_json else typer.echo, workers=workers)
    _emit(as_json, summary)


@app.command()
@_guard
def serve(
    root: Annotated[Path, typer.Option("--root", help="Workspace to serve (made by `anole run --out`).")] = Path("anole-runs/main"),
    cron: Annotated[str, typer.Option(help="Cron schedule of the retrain ('' for none).")] = "0 3 * * *",
    timezone: Annotated[str | None, typer.Option(help="Time zone of the cron schedule (default: UTC).")] = None,
    debounce: Annotated[float, typer.Option(help="Seconds to gather a burst of arriving domains into one retrain.")] = 60.0,
    minutes: Annotated[float, typer.Option(help="Training budget of each retrain.")] = 2.5,
    steps: Annotated[int | None, typer.Option(help="Fixed meta-updates per retrain instead of --minutes.")] = None,
    workers: Annotated[int, typer.Option(help="Ray adaptation workers per retrain; 0 trains in the flow's process.")] = 0,
    inbox: Annotated[Path | None, typer.Option(help="Folder scanned for new domain folders/zips on each retrain (default: ROOT/inbox).")] = None,
    api_url: Annotated[str | None, typer.Option(help="Prefect API to serve on (default: $PREFECT_API_URL, else a local server started here).")] = None,
    port: Annotated[int, typer.Option(help="Port of the local Prefect server when one is started.")] = 4200,
    oneshot: Annotated[bool, typer.Option(help="Score Lake's one-shot runs in each evaluation.")] = True,
) -> None:
    """Serve the retrain deployment (nightly cron + anole.domain.arrived trigger) and on-demand pipeline/ingest deployments."""
    from pipeline.config import Range, check_values

    check_values([  # before a server is started or the workspace made
        ("--debounce", debounce, Range(ge=0)),
        ("--minutes", minutes, Range(gt=0)),
        ("--steps", steps, Range(ge=1)),
        ("--workers", workers, Range(ge=0)),
        ("--port", port, Range(ge=1, le=65535)),
    ])
    _offline_env()
    from contextlib import nullcontext

    from flows.serve import local_server

    url = api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    root = root.expanduser().resolve()
    if url:
        server = nullcontext(url)
    else:
        root.mkdir(parents=True, exist_ok=True)
        typer.echo(f"no PREFECT_API_URL: starting a Prefect server on 127.0.0.1:{port} "
                   f"(database in {root / '.prefect-server'}, log {root / 'prefect-server.log'})")
        server = local_server(root / ".prefect-server", port=port, log=root / "prefect-server.log")
    with server as url:
        os.environ["PREFECT_API_URL"] = url  # flow runs started by the runner inherit it
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.serve import serve_workspace

        typer.echo(f"serving workspace {root} on {url}")
        with temporary_settings(updates={PREFECT_API_URL: url}):
            serve_workspace(root, cron=cron or None, timezone=timezone, debounce_s=debounce,
                            minutes=minutes, steps=steps, workers=workers, inbox=inbox,
                            oneshot=oneshot)


def main() -> None:
    """Console-script entry point. A flag click cannot parse (`--episodes abc`, `--bogus`) is one
    `error:` line and exit 2, like every other bad input, instead of click's boxed panel."""
    try:  # newer typer vendors click
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click  # type: ignore[no-redef]
    help_only = getattr(click, "NoArgsIsHelpError", ())  # bare `anole`; click < 8.2 just prints help

    try:
        code = app(standalone_mode=False)
    except help_only as exc:
        exc.show()
        code = exc.exit_code
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "anole"
        _tagged("error", "bold red", f"{exc.format_message()} (see `{where} --help`)")
        code = exc.exit_code
    except click.ClickException as exc:
        _tagged("error", "bold red", exc.format_message())
        code = exc.exit_code
    except typer.Abort:
        _tagged("error", "bold red", "aborted")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
