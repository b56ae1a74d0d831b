"""`kdplatform` command line: run, teacher, sweep, export, bench, report, ui, ls, methods, losses, tasks, models.

User mistakes (bad YAML, missing data, unusable checkpoints) print one clear message and exit 2, with
nothing started and nothing written to MLflow. Heavy imports (torch, transformers, ray) happen inside the
commands that need them, so `kdplatform --help` and validation stay fast.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kdplatform import tracking
from kdplatform.cli_help import HelpGroup, HelpTyper, output_console, version_callback
from kdplatform.config import ConfigError, ResolvedTrial, describe_trials, load_trials

app = HelpTyper(add_completion=False, no_args_is_help=True, cls=HelpGroup,
                help="Sweeps of knowledge distillation and quantization-aware training for BERT-like encoders.")
console = output_console()  # piped (logs, CI, `| cat`): wide, so table rows stay one line each
err = output_console(stderr=True)


MLFLOW_COMMANDS = {"run", "teacher", "sweep", "ls", "export", "report"}


@app.callback()
def _main(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", "-V", callback=version_callback, is_eager=True,
                                       help="print kdplatform's version and exit")) -> None:
    """Sweeps of knowledge distillation and quantization-aware training for BERT-like encoders."""
    if ctx.invoked_subcommand in MLFLOW_COMMANDS:  # MLflow's own INFO lines: to a file, named at the end
        from kdplatform.library_logs import send_library_logs_to_file, wrote_library_log

        log = send_library_logs_to_file()
        summary = ctx.invoked_subcommand in ("run", "sweep")  # their summary names the logs to look at
        ctx.call_on_close(lambda: wrote_library_log(warnings_only=not summary) and
                          err.print(f"MLflow's messages: {escape(str(log))}", soft_wrap=True))

OverridesArg = typer.Argument(None, metavar="KEY=VALUE", show_default=False,
                              help="settings over the file's, e.g. train.pred.lr=1e-4 seeds=[1] (values are YAML)")
TrackingOpt = typer.Option(None, "--tracking-uri", metavar="URI",
                           help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                           "else sqlite:///./mlflow.db)")
# Commands that read a YAML file: its `tracking_uri:` comes after the environment (tracking.pick_tracking_uri).
FileTrackingOpt = typer.Option(None, "--tracking-uri", metavar="URI",
                               help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                               "else the file's tracking_uri:, else sqlite:///./mlflow.db)")


def _error(message: str) -> None:
    """One error line on stderr (rich markup in `message` is rendered)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)


def _fail(message: str, code: int = 2) -> None:
    _error(message)
    raise typer.Exit(code)


def _user_errors():
    from kdplatform.distill.errors import DataError, TeacherError
    from kdplatform.distill.preflight import DeviceError
    from kdplatform.families import UnsupportedFamily
    from kdplatform.store_check import StoreUnusable

    return (ConfigError, DataError, TeacherError, DeviceError, tracking.CredentialsInUri, StoreUnusable,
            UnsupportedFamily)  # a hub model whose family shows only when its config is fetched


def _fail_for(file: Path, e: Exception) -> NoReturn:
    """A user error about `file`: one message that names the file (config errors already start with it)."""
    text = str(e)
    _fail((text if text.startswith(str(file)) else f"{file}: {text}").replace("[", r"\["))


def _load(file: Path, overrides: list[str] | None = None) -> tuple:
    try:
        return load_trials(file, overrides or [])
    except ConfigError as e:
        _fail(str(e).replace("[", r"\["))


def _preflight(file: Path, trials: list[ResolvedTrial]) -> None:
    """Data files and teacher checkpoints, checked before anything starts or MLflow is touched (exit 2)."""
    from kdplatform.distill.preflight import preflight

    try:
        preflight(trials)
    except _user_errors() as e:
        _fail(f"{file}: {e}".replace("[", r"\["))


def _check_store(uri: str, file: Path) -> None:
    """The tracking store answers and can be written (exit 2 in seconds otherwise), before any work."""
    from kdplatform.store_check import StoreUnusable, check_store

    try:
        check_store(uri)
    except StoreUnusable as e:
        _fail(f"{file}: {e}".replace("[", r"\["))


def _readable_store(uri: str) -> None:
    """`ls` and `export`: the store's check before MLflow opens it (a damaged or foreign file: exit 2, untouched)."""
    from kdplatform.store_check import StoreUnusable, check_store

    try:
        check_store(uri, write=False)
    except StoreUnusable as e:
        _fail(escape(str(e)))


def _uri(tracking_uri: str | None, trials: list[ResolvedTrial] | None = None, file: Path | None = None) -> str:
    """The store: --tracking-uri, else MLFLOW_TRACKING_URI, else the file's tracking_uri:, else ./mlflow.db."""
    try:
        return tracking.resolve_tracking_uri(tracking_uri, trials[0].tracking_uri if trials else None)
    except tracking.CredentialsInUri as e:
        _fail(f"{file}: {e}".replace("[", r"\[") if file else str(e))


def trial_table(trials: list[ResolvedTrial], done: set[str] | None = None, title: str = "trials") -> Table:
    table = Table(title=title)
    for col in ("#", "run name", "stages", "teacher", "cfg hash", "status"):
        table.add_column(col, overflow="fold")  # full run names, wrapped, never cut with an ellipsis
    for i, t in enumerate(trials, 1):
        stages = escape(t.stages_label)  # "ild[relation_kl]" is text, not rich markup
        status = "done" if done and t.cfg_hash in done else "to run"
        table.add_row(str(i), t.run_name, stages, t.teacher_hash[:8], t.cfg_hash[:8], status)
    return table


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


ForceOpt = typer.Option(False, "--force", help="run configs that already have a FINISHED run again (a new run each)")


@app.command()
def run(file: Path = typer.Argument(..., metavar="FILE", help="trial or sweep YAML"),
        overrides: Optional[list[str]] = OverridesArg,
        tracking_uri: Optional[str] = FileTrackingOpt,
        dry_run: bool = typer.Option(False, "--dry-run", "-n", help="validate, check the local data files and "
                                     "teacher checkpoints the run would read (nothing is downloaded), and list "
                                     "the trials; run nothing"),
        force: bool = ForceOpt) -> None:
    """Run the file's missing trials in this process, one after the other (the sweep without Ray)."""
    from kdplatform.sweep.expand import plan_sweep
    from kdplatform.sweep.local import check_runnable_here, run_local
    from kdplatform.sweep.session import SweepError

    try:
        plan = plan_sweep(file, tracking_uri, force=force, overrides=overrides or [])
    except _user_errors() as e:
        _fail_for(file, e)
    for n in plan.notes:
        console.print(f"[yellow]note:[/] {escape(n)}")
    console.print(trial_table(plan.trials, set(plan.done), title=f"{len(plan.trials)} trial(s) from {file}"))
    if dry_run:
        try:  # the real run's refusals (search:/scheduler:, data files, checkpoints, device), nothing written
            check_runnable_here(plan, file, fetch=False)
        except SweepError as e:
            _fail(str(e).replace("[", r"\["))
        except _user_errors() as e:
            _fail(f"{file}: {e}".replace("[", r"\["))
        for line in describe_trials(plan.trials):  # per stage: each loss term, its layer pairs and weight
            console.print(escape(line))
        return
    # `kill`/`timeout`, and Ctrl-C or `kill -INT` even where SIGINT arrives ignored (a background job of a
    # script, nohup), which leaves Python without its handler: end the open run as KILLED, not RUNNING
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _interrupt)
    try:
        outcome = run_local(plan, file, console=console)
    except SweepError as e:
        _fail(str(e).replace("[", r"\["))
    except _user_errors() as e:
        _fail(f"{file}: {e}".replace("[", r"\["))
    except KeyboardInterrupt:
        from kdplatform.sweep.session import command

        again = command("run", plan.spec_file, *plan.overrides, "--tracking-uri", tracking.redact(plan.tracking_uri))
        err.print(f"interrupted: the open trial ended KILLED; finished trials are kept. Continue with: {again}",
                  markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    raise typer.Exit(outcome.exit_code)


@app.command()
def teacher(file: Path = typer.Argument(..., metavar="FILE", help="trial or sweep YAML"),
            tracking_uri: Optional[str] = FileTrackingOpt) -> None:
    """Fine-tune (or find) every distinct teacher the file needs, once each."""
    _, trials, _ = _load(file)
    uri = _uri(tracking_uri, trials, file)
    _check_store(uri, file)
    _preflight(file, trials)
    from kdplatform.distill.teacher import ensure_teacher

    seen: dict[str, ResolvedTrial] = {}
    for t in trials:
        seen.setdefault(t.teacher_hash, t)
    for h, t in seen.items():
        try:
            folder = ensure_teacher(t, uri)
        except _user_errors() as e:
            _fail(str(e).replace("[", r"\["))
        console.print(f"teacher {h} ({t.task}, {t.teacher.model}): {folder}")


@app.command()
def sweep(file: Path = typer.Argument(..., metavar="FILE", help="sweep YAML"),
          overrides: Optional[list[str]] = OverridesArg,
          dry_run: bool = typer.Option(False, "--dry-run", "-n", help="check the local data files and teacher "
                                       "checkpoints (nothing is downloaded), print the trial table (count, teachers to train, trials already done) "
                                       "and run nothing"),
          resume: bool = typer.Option(False, "--resume", help="continue an interrupted run of this sweep file"),
          fresh: bool = typer.Option(False, "--fresh", help="abandon an interrupted run of this file (its open "
                                     "runs become KILLED) and start again; finished trials are still skipped"),
          address: Optional[str] = typer.Option(None, "--address", metavar="ADDRESS",
                                                help="join this Ray cluster (default: start "
                                                "a local one)"),
          max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", "-j", min=1, metavar="N",
                                                       help="at most N trials at once"),
          force: bool = ForceOpt,
          tracking_uri: Optional[str] = FileTrackingOpt,
          storage: Optional[Path] = typer.Option(None, "--storage", metavar="DIR", help="Ray results folder (default: "
                                                 "./ray_results)"),
          num_cpus: Optional[int] = typer.Option(None, "--num-cpus", min=1, metavar="N",
                                                 help="CPUs of the local Ray cluster"),
          num_gpus: Optional[int] = typer.Option(None, "--num-gpus", min=0, metavar="N",
                                                  help="GPUs of the local Ray cluster (0: run on the CPU, the "
                                                       "trials' GPU requests dropped)")
          ) -> None:
    """Run a sweep on Ray Tune: teachers once, then every missing student trial; resumable."""
    from kdplatform.sweep.driver import SweepError, run_sweep

    if resume and fresh:
        _fail("--resume and --fresh exclude each other")
    try:
        outcome = run_sweep(file, tracking_uri=tracking_uri, dry_run=dry_run, resume=resume, fresh=fresh,
                            force=force, address=address, max_concurrent=max_concurrent, storage=storage,
                            num_cpus=num_cpus, num_gpus=num_gpus, console=console, overrides=overrides or [])
    except SweepError as e:
        _fail(str(e).replace("[", r"\["))
    except _user_errors() as e:  # the file itself, the store, a data file or checkpoint it points at
        _fail_for(file, e)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


def _listing_console():
    """The console for `ls` tables (piped: wide, one line per row, for grep; see cli_help.output_console)."""
    return console


@app.command(name="ls")
def list_runs(tracking_uri: Optional[str] = TrackingOpt,
              sweep: Optional[str] = typer.Option(None, "--sweep", "-s", metavar="RUN_ID",
                                                  help="a parent run id (from plain `ls`): list its student runs "
                                                       "with their run ids (for `kdplatform export`)")) -> None:
    """List the store's sweeps and runs (parent runs) with their trial counts by status; with --sweep, the
    student runs of one of them."""
    from kdplatform import runs

    uri = _uri(tracking_uri)
    if runs.store_missing(uri):
        console.print(f"no runs yet: no store at {escape(tracking.redact(uri))}")
        return
    _readable_store(uri)
    if sweep:
        _list_students(uri, sweep)
        return
    rows = runs.list_sweeps(uri)
    table = Table(title=f"sweeps and runs in {escape(tracking.redact(uri))}", box=None, title_justify="left")
    table.add_column("experiment", overflow="fold", min_width=10)
    for col in ("kind", "status", "run id"):  # whole, never cut: ids go to `report --sweep`
        table.add_column(col, no_wrap=True)
    for col in ("started", "trials by status"):
        table.add_column(col, overflow="fold")
    for r in rows:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r.trials.items())) or "none"
        table.add_row(escape(r.experiment), r.runner, r.status, r.run_id, r.started, counts)
    out = _listing_console()
    if not rows:
        held = runs.store_contents(uri)
        out.print(f"no kdplatform sweeps or runs in this store; it holds {held['runs']} other run(s) in "
                  f"{held['experiments']} experiment(s) (logged by MLflow directly or another tool): browse them "
                  "with `kdplatform ui`" if held["runs"] else "no sweeps or runs in this store yet", soft_wrap=True)
        return
    out.print(table)
    out.print("a run's student runs and their run ids (what `kdplatform export` takes): "
              "kdplatform ls --sweep RUN_ID")


def _list_students(uri: str, parent_id: str) -> None:
    """`ls --sweep`: the student runs under one parent run, oldest first, with run ids and best dev scores."""
    from kdplatform import runs

    # a student names its parent run in MLflow's nesting tag and in kdp.sweep: either one finds it
    found = {r.info.run_id: r for f in (runs.student_filter(parent=parent_id), runs.student_filter(sweep=parent_id))
             for r in runs.search(uri, None, f)}
    if not found:
        _fail(f"no student runs under parent run {escape(parent_id)} in {escape(tracking.redact(uri))}\n"
              "  fix: pass a parent run id from `kdplatform ls` (and the same --tracking-uri)")
    table = Table(title=f"student runs of {escape(parent_id)}", box=None, title_justify="left")
    for col in ("run id", "status", "dev best"):
        table.add_column(col, no_wrap=True)
    table.add_column("run name", overflow="fold")
    for r in sorted(found.values(), key=lambda r: r.info.start_time or 0):
        score = r.data.metrics.get("dev/best_score")
        table.add_row(r.info.run_id, r.info.status, "-" if score is None else f"{score:.4f}",
                      escape(r.info.run_name or ""))
    out = _listing_console()
    out.print(table)


@app.command()
def export(run_id: str = typer.Argument(..., metavar="RUN_ID", help="a student run's MLflow run id"),
           dest: Path = typer.Argument(..., metavar="DEST", help="new (or empty) folder to write the model to"),
           tracking_uri: Optional[str] = TrackingOpt,
           which: str = typer.Option("best", "--which", metavar="best|last",
                                     help="best (best dev score) or last (end of training; "
                                     "kept with output.keep_models: best+last)"),
           fmt: str = typer.Option("hf", "--format", metavar="hf|onnx",
                                   help="hf (a Hugging Face folder) or onnx (model.onnx, checked against the "
                                   "PyTorch student on dev; needs kdplatform[onnx])"),
           int8: bool = typer.Option(False, "--int8", help="with --format onnx: also model_int8.onnx (dynamic "
                                     "int8; a QAT student keeps its trained quantized weights)"),
           min_agreement: float = typer.Option(0.99, "--min-agreement", min=0.0, max=1.0, metavar="FRACTION",
                                               help="classification: exit 2 (nothing written) when the exported "
                                                    "model's dev labels agree less with the PyTorch student's"),
           max_abs_diff: float = typer.Option(0.05, "--max-abs-diff", min=0.0, metavar="X",
                                              help="regression: exit 2 when a dev prediction differs more"),
           examples: Optional[int] = typer.Option(None, "--examples", min=1, metavar="N",
                                                  help="check agreement on the first N dev examples only")) -> None:
    """Copy a student run's saved model into a folder `from_pretrained` loads (quantized: see its README.md),
    or export it to ONNX (and int8) with its agreement with the PyTorch student."""
    if which not in ("best", "last"):
        _fail(f"--which takes best or last, not {which!r}")
    if fmt not in ("hf", "onnx"):
        _fail(f"--format takes hf or onnx, not {fmt!r}")
    if int8 and fmt != "onnx":
        _fail("--int8 needs --format onnx")
    from kdplatform import runs
    from kdplatform.distill.export import ExportError, export_run_model

    uri = _uri(tracking_uri)
    if not runs.store_missing(uri):
        _readable_store(uri)
    if fmt == "onnx":
        _export_onnx(run_id, dest, uri, which, int8, min_agreement, max_abs_diff, examples)
        return
    try:
        folder = export_run_model(uri, run_id, dest, which)
    except ExportError as e:
        _fail(escape(str(e)))
    console.print(f"{which} student of run {run_id} -> {escape(str(folder))}")
    if (folder / "README.md").is_file():
        console.print(escape((folder / "README.md").read_text().strip()))


def _deploy_extra() -> None:
    """The optional ONNX packages are installed, or one line saying how to get them (exit 2)."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        _fail(f"{', '.join(missing)} not installed: pip install 'kdplatform[onnx]'")


def _export_onnx(run_id: str, dest: Path, uri: str, which: str, int8: bool, min_agreement: float,
                 max_abs_diff: float, examples: int | None) -> None:
    _deploy_extra()
    from kdplatform.deploy.package import export_deployable
    from kdplatform.distill.export import ExportError

    try:
        out = export_deployable(uri, run_id, dest, which, int8=int8, min_agreement=min_agreement,
                                max_abs_diff=max_abs_diff, examples=examples,
                                say=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))
    except ExportError as e:
        _fail(escape(str(e)))
    sizes = ", ".join(f"{k} {v:.2f} MB" for k, v in out.sizes_mb.items())
    console.print(f"{which} student of run {run_id} -> {escape(str(out.folder))} ({sizes})")


@app.command()
def bench(run_ids: list[str] = typer.Argument(..., metavar="RUN_ID...", help="student run ids"),
          tracking_uri: Optional[str] = TrackingOpt,
          threads: int = typer.Option(1, "--threads", min=1, metavar="N", help="intra-op threads of PyTorch and ONNX Runtime"),
          warmup: int = typer.Option(5, "--warmup", min=0, metavar="N", help="untimed calls before timing"),
          iters: int = typer.Option(50, "--iters", min=2, metavar="N", help="timed batch-1 calls (p50, p95 over them)"),
          batch_iters: int = typer.Option(5, "--batch-iters", min=1, metavar="N", help="timed batch-32 calls"),
          which: str = typer.Option("best", "--which", metavar="best|last", help="best or last")) -> None:
    """Measure size on disk, batch-1 latency and batch-32 throughput of students as PyTorch fp32, ONNX fp32
    and ONNX int8 on this machine; log them to each run as deploy/* metrics (CPU and threads as tags)."""
    if which not in ("best", "last"):
        _fail(f"--which takes best or last, not {which!r}")
    _deploy_extra()
    from kdplatform import runs
    from kdplatform.deploy.bench import BenchSettings, bench_run
    from kdplatform.distill.export import ExportError

    uri = _uri(tracking_uri)
    if not runs.store_missing(uri):
        _readable_store(uri)
    settings = BenchSettings(threads=threads, warmup=warmup, iters=iters, batch_iters=batch_iters)
    failed = []
    for run_id in run_ids:  # a bad id is reported and skipped: the others' measurements are still logged
        try:
            bench_run(uri, run_id, settings, which,
                      say=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))
        except ExportError as e:
            _error(escape(str(e)))
            failed.append(run_id)
    if failed:
        _fail(f"{len(failed)} of {len(run_ids)} runs not measured: {' '.join(failed)} (see above)")


@app.command()
def methods() -> None:
    """List KD method presets and their loss terms per stage."""
    from kdplatform.config import PRESETS

    table = Table(title="methods")
    for col in ("name", "stages (loss terms)", "axes", "description"):
        table.add_column(col, overflow="fold")
    for p in PRESETS.values():
        stages = " -> ".join(f"{s.name}[{'+'.join(t['name'] for t in s.losses)}"
                             f"{'+mixup' if s.mixup else ''}{'+consistency' if s.consistency else ''}]"
                             for s in p.stages) or "(yours)"
        stages = escape(stages)  # "ild[relation_kl]" is text, not rich markup
        axes = [a for a, used in (("layer_map", p.layer_map), ("consistency_weight", p.uses_consistency),
                                  ("map_coeff/output_coeff", p.uses_mix_coeffs)) if used]
        table.add_row(p.name, stages, ", ".join(axes) or "-", p.description)
    console.print(table)


@app.command()
def losses() -> None:
    """List the loss menu: what each loss reads, its options and its roles (the one table that decides them)."""
    from kdplatform.loss_menu import LOSS_MENU

    table = Table(title="losses (kdplatform/loss_menu.py)")
    for col in ("name", "reads", "layers", "options", "roles", "what it is"):
        table.add_column(col, overflow="fold")
    for i in LOSS_MENU.values():
        roles = [r for r, on in (("teacher", i.needs_teacher), ("trains head", i.trains_head),
                                 ("labels", i.reads_labels), ("projects if widths differ",
                                                              i.projects_when_widths_differ),
                                 ("consistency", i.consistency)) if on]
        table.add_row(i.name, ", ".join(sorted(i.reads)), "per layer" if i.per_layer else "-",
                      ", ".join(sorted(i.options)) or "-", ", ".join(roles), i.summary)
    console.print(table)


@app.command()
def tasks() -> None:
    """List GLUE tasks, their metrics and where their data comes from."""
    from kdplatform.task_table import TASKS

    glue = os.environ.get("KDP_GLUE_DIR")
    table = Table(title=f"tasks (KDP_GLUE_DIR={glue or 'unset: hub'})")
    for col in ("name", "labels", "metrics", "dev splits", "local files"):
        table.add_column(col)
    for t in TASKS.values():
        local = "-"
        if glue:
            local = "yes" if (Path(glue) / t.glue_dir / "train.tsv").is_file() else "dev only" if \
                (Path(glue) / t.glue_dir).is_dir() else "no"
        table.add_row(t.name, str(t.num_labels), ", ".join(t.metrics), ", ".join(t.dev_splits), local)
    console.print(table)


@app.command()
def models() -> None:
    """List the known model names and the encoder families (kdplatform/families.py) with what each supports."""
    from kdplatform.config import MODEL_ALIASES
    from kdplatform.families import family_rows

    names = Table(title="models (teacher.model / student.init; or a local folder of a family below)")
    for col in ("name", "family", "layers", "width", "source"):
        names.add_column(col)
    for name, a in MODEL_ALIASES.items():
        offline = a.get("package") or (f"wheels {a['wheels'][0]}..{a['wheels'][-1][-3:]}" if a.get("wheels") else "")
        names.add_row(name, a["family"], str(a["layers"]), str(a["width"]),
                      a["hub"] + (f" (offline: {offline})" if offline else ""))
    console.print(names)
    rows = family_rows()
    families = Table(title="families")
    for col in rows[0]:
        families.add_column(col, overflow="fold")
    for row in rows:
        families.add_row(*row.values())
    console.print(families)


@app.command()
def report(experiment: Optional[str] = typer.Option(None, "--experiment", "-e", metavar="NAME",
                                                    help="MLflow experiment (the sweep file's name)"),
           sweep: Optional[str] = typer.Option(None, "--sweep", "-s", metavar="RUN_ID", help="parent sweep run id"),
           dashboard: Optional[list[str]] = typer.Option(None, "--dashboard", "-d", metavar="FILE|NAME",
                                                         help="dashboards/FILE.yaml or a name; repeatable "
                                                              "(default: every dashboard)"),
           out: Path = typer.Option(Path("report"), "--out", "-o", metavar="DIR", help="output folder"),
           formats: str = typer.Option("html,png,tex,md,csv", "--format", "-f", metavar="LIST",
                                       help="any of html,png,svg,pdf,tex,md,csv or 'all'"),
           tracking_uri: Optional[str] = TrackingOpt) -> None:
    """Paper-style accuracy tables and overfitting/bit-width/sweep figures from MLflow runs."""
    from kdplatform.report.render import report_command

    raise typer.Exit(report_command(experiment, sweep, dashboard, str(out), formats, tracking_uri))


@app.command()
def ui(tracking_uri: Optional[str] = TrackingOpt,
       host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS",
                                help="bind address (127.0.0.1: this machine only; any other needs --read-only "
                                "or --auth)"),
       port: int = typer.Option(5000, "--port", "-p", metavar="PORT", help="port the UI listens on"),
       read_only: bool = typer.Option(False, "--read-only", help="refuse the UI's write endpoints (delete, "
                                      "create, rename, log): browse only"),
       auth: bool = typer.Option(False, "--auth", help="MLflow's basic-auth login (user admin, password from "
                                 "$MLFLOW_AUTH_ADMIN_PASSWORD)"),
       allowed_hosts: Optional[str] = typer.Option(None, "--allowed-hosts", metavar="HOSTS",
                                                   help="Host headers the server accepts, comma-separated "
                                                   "(passed to MLflow)")) -> None:
    """Start the MLflow UI on the store (bound to 127.0.0.1 unless told otherwise)."""
    from kdplatform import ui_server

    uri = _uri(tracking_uri)
    access = ui_server.Access(auth=auth, read_only=read_only, allowed_hosts=allowed_hosts)
    try:
        ui_server.check_access(host, access)
        ui_server.check_ui_store(uri)
        ui_server.check_port_free(host, port)
    except ui_server.UiError as e:
        _fail(str(e).replace("[", r"\["))
    from kdplatform.library_logs import logs_dir

    log = logs_dir() / f"ui-{port}.log"  # the server's own output (Starlette warnings, access lines)
    mode = " (read-only)" if read_only else " (login: admin)" if auth else ""
    console.print(f"MLflow UI on {ui_server.url_of(host, port)} for {escape(tracking.redact(uri))}{mode} "
                  f"(server log: {escape(str(log))})", soft_wrap=True)
    code = ui_server.serve(uri, host, port, access, log)
    if code:
        err.print(f"the MLflow UI ended with exit code {code}; the end of its log:\n"
                  f"{escape(ui_server.log_tail(log))}", soft_wrap=True)
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
