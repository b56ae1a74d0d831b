"""Read student runs, their teachers and metric histories from MLflow into pandas (no torch here).

Two ways to read, giving the same frames (a test holds them equal):

- the public API (any store, any MLflow version): `MlflowClient.search_runs` (paged) for runs with their
  params, tags and latest metrics, and `get_metric_history` per (run, key) on a thread pool;
- a fast path for database stores (SQLite, PostgreSQL, MySQL): the same rows read straight from the store's
  `runs`, `tags`, `params`, `latest_metrics` and `metrics` tables through its SQLAlchemy engine, about 10x
  faster for thousands of runs. Those tables are MLflow's internal schema, so the fast path is used only for
  the MLflow versions it was checked against (`SQL_FAST_PATH_MLFLOW`); any other version, a non-database
  store, or a SQL error falls back to the public API.

>>> data = collect_runs("sqlite:////abs/mlflow.db", experiment="quickstart")    # doctest: +SKIP
>>> data.runs[["task", "method", "seed", "best_score"]].head()             # doctest: +SKIP
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd

from kdplatform import runs
from kdplatform.report.reference import majority_levels
from kdplatform.task_table import TASK_NAMES, TASKS

TASK_ORDER = TASK_NAMES  # the task table's (GLUE's) order
TASK_LABELS = {name: t.label for name, t in TASKS.items()}
METHOD_ORDER = ("kd", "pkd", "tinybert", "minilm", "ild_last", "cr_ild", "supplementary_ild", "ternarybert",
                "kdqat_map", "kdqat_output", "kdqat_unified", "custom")
QAT_METHODS = ("ternarybert", "kdqat_map", "kdqat_output", "kdqat_unified")
# Trial axes besides task and seed (DESIGN.md: the grid); all logged as string params, '' = not applicable.
CONFIG_AXES = ("method", "layer_map", "consistency_weight", "bits", "act_bits", "map_coeff", "output_coeff")
AXIS_LABELS = {"method": "Method", "layer_map": "Layer map", "consistency_weight": "CR weight",
               "bits": "W bits", "act_bits": "A bits", "map_coeff": "Map coeff", "output_coeff": "Output coeff",
               "task": "Task", "seed": "Seed"}
# What the default dashboards draw; dashboards may ask for more keys (e.g. `dev/accuracy`).
DEFAULT_HISTORY_KEYS = ("dev/score", "train/score", "gap/score", "train/distill_loss", "dev/distill_loss",
                        "gap/distill_loss")
# Tag names and run filters: runs.py owns them (no torch there).
STAGE_KEY = "stage"  # the stage index (0, 1, ...) logged at every evaluation
KEPT_STATUSES = ("FINISHED", "RUNNING")  # FAILED/KILLED runs stop early: their best score would mislead


class ReportError(Exception):
    """A user-facing problem (no runs, unknown experiment, bad option): printed without traceback, exit 2."""


def default_tracking_uri(flag: str | None = None) -> str:
    """The same store `kdplatform run`/`sweep` write to (`tracking.pick_tracking_uri`, the one place of the
    order): `flag` (--tracking-uri), else `MLFLOW_TRACKING_URI`, else ./mlflow.db."""
    from kdplatform.tracking import pick_tracking_uri

    return pick_tracking_uri(flag)


def redact(uri: str) -> str:
    """Hide a password in a URI before printing it."""
    return re.sub(r"(://[^/:@\s]+):[^@/\s]+@", r"\1:***@", uri)


def ui_base_url(tracking_uri: str) -> str | None:
    """The MLflow UI address when the tracking URI is a server (runs get links); None for a file/DB store."""
    scheme = urlparse(tracking_uri).scheme
    if scheme in ("http", "https"):
        return re.sub(r"//[^/@]*@", "//", tracking_uri).rstrip("/")  # never put credentials in a page
    return None


def run_url(ui_base: str | None, experiment_id: str, run_id: str) -> str | None:
    if not ui_base:
        return None
    return f"{ui_base}/#/experiments/{experiment_id}/runs/{run_id}"


TEACHER_COLUMNS = ["run_id", "run_name", "task", "teacher_hash", "best_score", "final_score"]


@dataclass
class ReportData:
    """Student runs (one row each) and their metric histories (long format), ready for tables and figures.

    `runs` columns: run_id, run_name, experiment_id, experiment, status, start_time, sweep_id, task, seed,
    teacher_hash, n_stages, the CONFIG_AXES (strings as logged, '' = not applicable), best_score (max of
    dev/score), best_step, final_score (the last dev/score), `params.<name>` for every param and
    `metrics.<key>` for each metric's last value.
    `history` columns: run_id, key, step, value (sorted by run, key, step); always holds `stage`.
    `teachers`: the teacher runs of these students (run_id, run_name, task, teacher_hash, best_score,
    final_score). `majority`: task -> the dev score of always predicting the majority class (x1).
    """

    runs: pd.DataFrame
    history: pd.DataFrame
    tracking_uri: str
    experiments: dict[str, str]
    search_axes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    teachers: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TEACHER_COLUMNS))
    majority: dict[str, float] = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # derived values of these runs

    @property
    def ui_base(self) -> str | None:
        return ui_base_url(self.tracking_uri)

    def run_link(self, run_id: str) -> str | None:
        row = self.runs.loc[self.runs.run_id == run_id]
        if row.empty:
            return None
        return run_url(self.ui_base, row.experiment_id.iloc[0], run_id)

    def key_history(self, key: str) -> pd.DataFrame:
        """The history rows of one metric key (run_id, key, step, value); split once, then cached."""
        if "by_key" not in self.cache:
            self.cache["by_key"] = {k: g for k, g in self.history.groupby("key", sort=False)}
        empty = self.history.iloc[0:0]
        return self.cache["by_key"].get(key, empty)

    def subset(self, mask: pd.Series) -> ReportData:
        runs = self.runs[mask].reset_index(drop=True)
        return ReportData(runs, self.history[self.history.run_id.isin(runs.run_id)], self.tracking_uri,
                          self.experiments, list(self.search_axes), list(self.notes),
                          self.teachers[self.teachers.teacher_hash.isin(runs.teacher_hash)], dict(self.majority))


# ---------------------------------------------------------------------------------------------- store
def _check_store(tracking_uri: str) -> None:
    """Refuse to 'report' on a SQLite file that does not exist (MLflow would silently create it)."""
    if tracking_uri.startswith("sqlite:///"):
        path = unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
        if path and path != ":memory:" and not Path(path).exists():
            raise ReportError(f"no MLflow store at {path}: run a sweep first (`kdplatform sweep "
                              f"sweeps/quickstart.yaml`), or point --tracking-uri / MLFLOW_TRACKING_URI "
                              f"at your store")
    elif "://" not in tracking_uri and not Path(tracking_uri).exists():
        raise ReportError(f"no MLflow store at {tracking_uri}")
    from kdplatform.store_check import StoreUnusable, check_store

    try:  # damaged, not MLflow's, a server that does not answer: one message, the file untouched
        check_store(tracking_uri, write=False)
    except StoreUnusable as e:
        raise ReportError(str(e)) from None


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# MLflow versions whose tracking-store tables the fast path reads (checked on 3.10 - 3.17); pyproject pins the
# same range. Outside it the report uses the public API only.
SQL_FAST_PATH_MLFLOW = ">=3.10,<3.18"


def sql_fast_path_supported(mlflow_version: str) -> bool:
    """Whether the SQL fast path may read this MLflow version's tables (see SQL_FAST_PATH_MLFLOW)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(mlflow_version) in SpecifierSet(SQL_FAST_PATH_MLFLOW)
    except InvalidVersion:
        return False


def _sql_engine(client):
    """The SQLAlchemy engine behind a database-backed tracking store when the fast path applies, else None
    (HTTP server, file store, or an MLflow version whose tables were not checked)."""
    import mlflow

    if not sql_fast_path_supported(mlflow.__version__):
        return None
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return getattr(store, "engine", None)


def search_all_runs(client, experiment_ids: list[str], filter_string: str) -> list:
    """All matching active runs, following page tokens (50,000 per page: one query for a typical sweep)."""
    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=50_000,
                                  page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def fetch_histories(client, run_ids: list[str], keys: list[str], max_workers: int = 8,
                    sql: bool | None = None) -> pd.DataFrame:
    """Metric histories of `keys` for `run_ids` as a long DataFrame (run_id, key, step, value).

    Database store: one SQL query per 500 runs on the `metrics` table (indexed by run_uuid, key, step).
    Other stores: `get_metric_history` per (run, key) on a thread pool. A point logged twice at the same
    step (a resumed trial) keeps its latest value. `sql=False` forces the per-call path (tests, benchmark).
    """
    cols = ["run_id", "key", "step", "value"]
    if not run_ids or not keys:
        return pd.DataFrame(columns=cols)
    engine = _sql_engine(client) if sql is not False else None
    frames = []
    if engine is not None:
        import sqlalchemy as sa

        query = sa.text("SELECT run_uuid AS run_id, key, step, value, is_nan, timestamp FROM metrics "
                        "WHERE run_uuid IN :runs AND key IN :keys").bindparams(
            sa.bindparam("runs", expanding=True), sa.bindparam("keys", expanding=True))
        with engine.connect() as conn:
            for i in range(0, len(run_ids), 500):
                frames.append(pd.read_sql(query, conn, params={"runs": run_ids[i:i + 500], "keys": list(keys)}))
        df = pd.concat(frames, ignore_index=True)
        df.loc[df.is_nan.astype(bool), "value"] = float("nan")
    else:
        df = _histories_over_api(client, run_ids, keys, max_workers)
    df = df.sort_values(["run_id", "key", "step", "timestamp"], kind="stable")
    df = df.drop_duplicates(["run_id", "key", "step"], keep="last")
    df["step"] = df["step"].astype("int64")
    df["value"] = df["value"].astype("float64")
    return df[cols].reset_index(drop=True)


def _histories_over_api(client, run_ids: list[str], keys: list[str], max_workers: int) -> pd.DataFrame:
    """One public `get_metric_history` call per (run, key) on a thread pool (any store, any version)."""
    def one(job):
        run_id, key = job
        return [(run_id, key, m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]

    rows: list[tuple] = []
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for chunk in pool.map(one, [(r, k) for r in run_ids for k in keys]):
            rows += chunk
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value", "timestamp"])


# --------------------------------------------------------------------------------------------- collect
def _all_experiments(client) -> list:
    out, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _resolve_scope(client, experiment: str | None, sweep: str | None, uri: str):
    """(experiment ids, student filter string, sweep runs) for the requested scope."""
    from mlflow.exceptions import MlflowException

    student = runs.student_filter()
    if sweep:
        try:
            run = client.get_run(sweep)
        except MlflowException as e:
            raise ReportError(f"sweep run {sweep!r} not found in {redact(uri)}") from e
        role = run.data.tags.get(runs.ROLE)
        if role != runs.SWEEP_ROLE:
            raise ReportError(f"run {sweep!r} is a {role or 'non-kdplatform'} run, not a sweep: pass the "
                              f"parent sweep run id (tag {runs.ROLE} = {runs.SWEEP_ROLE})")
        exp = run.info.experiment_id
        if experiment:
            e = client.get_experiment_by_name(experiment)
            if e is None or e.experiment_id != exp:
                raise ReportError(f"sweep {sweep} does not belong to experiment {experiment!r}")
        return [exp], runs.student_filter(sweep=sweep), [run]
    if experiment:
        e = client.get_experiment_by_name(experiment)
        if e is None or e.lifecycle_stage != "active":
            names = ", ".join(sorted(x.name for x in _all_experiments(client) if x.name != "Default")) or "none"
            raise ReportError(f"experiment {experiment!r} not found in {redact(uri)} (experiments there: "
                              f"{names}); the experiment name is the sweep file's `name`")
        ids = [e.experiment_id]
    else:
        ids = [e.experiment_id for e in _all_experiments(client)]
    if not ids:
        raise ReportError(f"no experiments in {redact(uri)}: run a sweep first")
    sweeps = search_all_runs(client, ids, runs.tag_is(runs.ROLE, runs.SWEEP_ROLE))
    return ids, student, sweeps


RUN_COLUMNS = ["run_id", "run_name", "experiment_id", "status", "start_time"]


def _finish_runs_frame(df: pd.DataFrame, names: dict[str, str]) -> pd.DataFrame:
    """Add the report's columns to one-row-per-run data holding RUN_COLUMNS, `params.*`, `tags.*` and
    `metrics.*` (the same frame whichever way the runs were read)."""
    df = df.copy()

    def col(name: str, fallback: str | None = None) -> pd.Series:
        out = df[name] if name in df.columns else pd.Series("", index=df.index, dtype=object)
        if fallback is not None and fallback in df.columns:
            out = out.where(out.notna() & (out != ""), df[fallback])
        return out.fillna("").astype(str)

    df["experiment_id"] = df["experiment_id"].astype(str)
    df["experiment"] = df["experiment_id"].map(lambda e: names.get(e, e))
    df["start_time"] = pd.to_numeric(df["start_time"], errors="coerce").fillna(0).astype("int64")
    def tag(name: str) -> str:
        return "tags." + name

    df["sweep_id"] = col(tag(runs.SWEEP))
    df["cfg_hash"] = col(tag(runs.CFG_HASH)).where(col(tag(runs.CFG_HASH)) != "", df["run_id"])
    df["task"] = col("params.task", tag(runs.TASK))
    df["seed"] = pd.to_numeric(col("params.seed", tag(runs.SEED)), errors="coerce").fillna(-1).astype("int64")
    df["method"] = col("params.method", tag(runs.METHOD))
    df["teacher_hash"] = col(tag(runs.TEACHER_HASH), "params.teacher_hash")
    stage_names = [c for c in df.columns if re.fullmatch(r"params\.train\.[^.]+\.lr", c)]
    df["n_stages"] = df[stage_names].notna().sum(axis=1).clip(lower=1).astype("int64") if stage_names else 1
    for axis in CONFIG_AXES[1:]:
        df[axis] = col(f"params.{axis}")
    df = df.drop(columns=[c for c in df.columns if c.startswith("tags.")])
    return df.reset_index(drop=True)


def _runs_from_api(found: list, names: dict[str, str]) -> pd.DataFrame:
    rows = []
    for r in found:
        row = {"run_id": r.info.run_id, "run_name": r.info.run_name, "experiment_id": r.info.experiment_id,
               "status": r.info.status, "start_time": r.info.start_time or 0}
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update({f"tags.{k}": v for k, v in r.data.tags.items() if k.startswith(runs.TAG_PREFIX)})
        row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
        rows.append(row)
    return _finish_runs_frame(pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS), names)


def _runs_from_sql(engine, experiment_ids: list[str], sweep: str | None, names: dict[str, str]) -> pd.DataFrame:
    """The student runs straight from the store's tables: the same frame as `search_runs` gives, about 10x
    faster for thousands of runs (MLflow's search loads every run's entities object by object)."""
    import sqlalchemy as sa

    sweep_join = ("JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = :sweep_tag AND s.value = :sweep "
                  if sweep else "")
    runs_q = sa.text(
        "SELECT r.run_uuid AS run_id, r.name AS run_name, r.experiment_id, r.status, r.start_time FROM runs r "
        "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = :role_tag AND t.value = :student " + sweep_join +
        "WHERE r.experiment_id IN :exps AND r.lifecycle_stage = 'active'").bindparams(
        sa.bindparam("exps", expanding=True))
    params: dict = {"exps": [int(e) if str(e).isdigit() else e for e in experiment_ids],
                    "role_tag": runs.ROLE, "student": runs.STUDENT}
    if sweep:
        params.update(sweep=sweep, sweep_tag=runs.SWEEP)
    with engine.connect() as conn:
        students = pd.read_sql(runs_q, conn, params=params)
        ids = students.run_id.tolist()
        wide = [students.set_index("run_id")]
        for table, prefix, extra in (("params", "params.", ""), ("tags", "tags.", " AND key LIKE :tag_prefix"),
                                     ("latest_metrics", "metrics.", "")):
            q = sa.text(f"SELECT run_uuid AS run_id, key, value FROM {table} WHERE run_uuid IN :runs{extra}"
                        ).bindparams(sa.bindparam("runs", expanding=True))
            long = pd.concat([pd.read_sql(q, conn, params={"runs": ids[i:i + 500],
                                                           **({"tag_prefix": runs.TAG_PREFIX + "%"} if extra else {})})
                              for i in range(0, len(ids), 500)] or [pd.DataFrame(columns=["run_id", "key", "value"])],
                             ignore_index=True)
            if table == "latest_metrics":
                long["value"] = long["value"].astype("float64")
            w = long.pivot(index="run_id", columns="key", values="value")
            wide.append(w.rename(columns=lambda k, p=prefix: p + k))
    df = pd.concat(wide, axis=1).reset_index().rename(columns={"index": "run_id"})
    return _finish_runs_frame(df, names)


def _read_runs(client, ids: list[str], sweep: str | None, student_filter: str, names: dict[str, str],
               sql: bool | None, notes: list[str]) -> tuple[pd.DataFrame, bool]:
    """(student runs frame, whether the SQL fast path was used); a SQL error falls back to the API."""
    engine = _sql_engine(client) if sql is not False else None
    if engine is not None:
        import sqlalchemy as sa

        try:
            return _runs_from_sql(engine, ids, sweep, names), True
        except sa.exc.SQLAlchemyError as e:  # a schema this version check did not foresee
            notes.append(f"store tables not readable directly ({type(e).__name__}); read through the MLflow API")
    return _runs_from_api(search_all_runs(client, ids, student_filter), names), False


def _usable_runs(df: pd.DataFrame, where: str, notes: list[str]) -> pd.DataFrame:
    """Finished or running runs, the latest of each repeated trial."""
    dropped = df[~df.status.isin(KEPT_STATUSES)]
    if len(dropped):
        notes.append(f"{len(dropped)} failed or killed run(s) left out "
                     f"({', '.join(sorted(dropped.status.unique()))})")
    df = df[df.status.isin(KEPT_STATUSES)]
    before = len(df)
    df = df.sort_values("start_time").drop_duplicates("cfg_hash", keep="last")
    if len(df) < before:
        notes.append(f"{before - len(df)} older run(s) of a repeated trial left out (latest kept)")
    if df.empty:
        raise ReportError(f"no finished or running student runs in {where} (all failed or were killed)")
    return df


def dev_scores(history: pd.DataFrame) -> pd.DataFrame:
    """Per run: best_score (max dev/score), best_step (its step) and final_score (the last dev/score)."""
    dev = history[(history.key == "dev/score") & history.value.notna()]
    best = dev.loc[dev.groupby("run_id").value.idxmax(), ["run_id", "value", "step"]]
    best = best.rename(columns={"value": "best_score", "step": "best_step"}).set_index("run_id")
    best["final_score"] = dev.sort_values("step").groupby("run_id").value.last()
    return best.reset_index()


def _teacher_runs(client, hashes: set[str]) -> pd.DataFrame:
    """The teacher runs (tag kdp.role = teacher) of these teacher hashes, in any experiment, with their dev
    scores. A teacher fine-tuned twice keeps its latest finished run."""
    if not hashes:
        return pd.DataFrame(columns=TEACHER_COLUMNS)
    ids = [e.experiment_id for e in _all_experiments(client)]
    teachers = [r for r in search_all_runs(client, ids, runs.where(runs.tag_is(runs.ROLE, runs.TEACHER),
                                                                   runs.status_is("FINISHED")))
                if r.data.tags.get(runs.TEACHER_HASH) in hashes]
    teachers.sort(key=lambda r: r.info.start_time or 0)
    rows = {}
    for r in teachers:
        rows[r.data.tags[runs.TEACHER_HASH]] = (r.info.run_id, r.info.run_name,
                                                r.data.params.get("task", r.data.tags.get(runs.TASK, "")))
    frame = pd.DataFrame([(rid, name, task, h) for h, (rid, name, task) in rows.items()],
                         columns=TEACHER_COLUMNS[:4])
    history = fetch_histories(client, frame.run_id.tolist(), ["dev/score"], sql=False)
    scores = dev_scores(history) if len(history) else pd.DataFrame(columns=["run_id", "best_score", "final_score"])
    return frame.merge(scores[["run_id", "best_score", "final_score"]], on="run_id", how="inner")


def teacher_notes(students: pd.DataFrame, teachers: pd.DataFrame) -> list[str]:
    """Why the teacher row is not drawn for a task: none of its students' teacher hashes has a finished
    teacher run in this store (the report finds teachers by hash, in every experiment of the store)."""
    found = set(teachers.teacher_hash)
    given = students.get("params.teacher.checkpoint", pd.Series("", index=students.index)).fillna("").astype(str)
    ready, cached = [], []
    for task in sorted(set(students.task), key=task_sort_key):
        mine = students.task == task
        if found & set(students.teacher_hash[mine]):
            continue
        (ready if (given[mine] != "").all() else cached).append(task)
    notes = []
    if cached:
        notes.append(f"teacher row not drawn for {', '.join(cached)}: no finished teacher run (tag {runs.ROLE} = "
                     f"{runs.TEACHER}) with its teacher hash in this store; the teacher came from the teacher cache "
                     f"(KDP_CACHE_DIR), and its fine-tune run is in the store that trained it (run id in the "
                     f"cached teacher's kdp_teacher.json)")
    if ready:
        notes.append(f"teacher row not drawn for {', '.join(ready)}: the teacher is a ready checkpoint "
                     f"(teacher.checkpoint), not fine-tuned in a run of this store, so no run holds its dev score")
    return notes


def _search_axes(sweep_runs: list) -> list[str]:
    out: list[str] = []
    for s in sweep_runs:
        if s.data.tags.get(runs.SEARCH) == "optuna":
            for name in s.data.tags.get(runs.SEARCH_AXES, "").split(","):
                if name.strip() and name.strip() not in out:
                    out.append(name.strip())
    return out


def collect_runs(tracking_uri: str, experiment: str | None = None, sweep: str | None = None,
                 history_keys: list[str] | tuple[str, ...] = DEFAULT_HISTORY_KEYS,
                 sql: bool | None = None) -> ReportData:
    """Student runs of one experiment (or one sweep) with their histories and teachers. Raises ReportError
    on missing data: unknown experiment/sweep, no student runs, or no run with a dev evaluation.

    `sql`: None reads a database store's tables directly when the MLflow version allows it (see the module
    doc), False uses the public MLflow API only (as for an HTTP server).
    """
    _check_store(tracking_uri)
    client = _client(tracking_uri)
    ids, student_filter, sweep_runs = _resolve_scope(client, experiment, sweep, tracking_uri)
    names = {i: client.get_experiment(i).name for i in ids}
    notes: list[str] = []
    df, used_sql = _read_runs(client, ids, sweep, student_filter, names, sql, notes)
    where = f"sweep {sweep}" if sweep else f"experiment {experiment!r}" if experiment else redact(tracking_uri)
    if df.empty:
        raise ReportError(f"no student runs (tag kdp.role = student) in {where}: has the sweep run yet?")
    if not experiment and not sweep and df.experiment_id.nunique() > 1:
        counts = df.groupby("experiment").size().sort_index()
        listing = ", ".join(f"{n} ({c} runs)" for n, c in counts.items())
        raise ReportError(f"student runs of several experiments in {redact(tracking_uri)}: {listing}; "
                          f"choose one with --experiment NAME (or --sweep RUN_ID)")
    df = _usable_runs(df, where, notes)
    keys = list(dict.fromkeys(["dev/score", STAGE_KEY, *history_keys]))
    history = fetch_histories(client, df.run_id.tolist(), keys, sql=used_sql)
    df = df.merge(dev_scores(history), on="run_id", how="left")
    missing = df.best_score.isna()
    if missing.all():
        raise ReportError(f"{len(df)} student run(s) in {where} but none has dev metrics (dev/score): did "
                          f"they stop before their first evaluation? Check them in the MLflow UI")
    if missing.any():
        notes.append(f"{int(missing.sum())} run(s) without dev metrics left out: "
                     f"{', '.join(df.run_name[missing].astype(str).head(5))}"
                     f"{' ...' if missing.sum() > 5 else ''}")
        df = df[~missing]
    df = sort_runs(df).reset_index(drop=True)
    history = history[history.run_id.isin(df.run_id)].reset_index(drop=True)
    teachers = _teacher_runs(client, set(df.teacher_hash) - {""})
    notes += teacher_notes(df, teachers)
    majority, why = majority_levels(df)
    notes += why
    return ReportData(df, history, tracking_uri, {i: names.get(i, i) for i in df.experiment_id.unique()},
                      _search_axes(sweep_runs), notes, teachers, majority)


# ------------------------------------------------------------------------------------------ ordering
def axis_sort_key(value: str) -> tuple:
    """Order axis values like a reader expects: '' (n/a) first, numbers numerically, then text."""
    if value == "":
        return (0, 0.0, "")
    try:
        return (1, float(value), "")
    except ValueError:
        pass
    order = {"uniform": 0, "last": 1, "skip": 2}
    return (2, float(order.get(value, 10)), value)


def task_sort_key(task: str) -> tuple:
    return (TASK_ORDER.index(task), task) if task in TASK_ORDER else (len(TASK_ORDER), task)


def method_sort_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method), method) if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def sort_key(column: str):
    if column == "task":
        return task_sort_key
    if column == "method":
        return method_sort_key
    if column == "seed":
        return lambda v: (int(v),)
    return lambda v: axis_sort_key(str(v))


def sort_runs(df: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    columns = columns or [c for c in ("task", *CONFIG_AXES, "seed") if c in df.columns]
    keys = {c: df[c].map(sort_key(c)) for c in columns}
    order = sorted(range(len(df)), key=lambda i: tuple(keys[c].iloc[i] for c in columns))
    return df.iloc[order]


def tasks_in(df: pd.DataFrame) -> list[str]:
    return sorted(df.task.unique(), key=task_sort_key)
