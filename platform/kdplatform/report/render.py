"""`kdplatform report`: MLflow runs -> one offline HTML page + tables (HTML/Markdown/LaTeX/CSV) + images.

Output folder:

    index.html                 every dashboard as a section (blocks without data listed once at the end
                               as "not drawn", not drawn empty); works offline
    plotly.min.js              the plotting library, one shared file beside the page (only with figures)
    tables/<page>-<name>.html|md|tex|csv
    figures/<page>-<figure>.png|svg|pdf   (static export through kaleido and a system Chromium)
    runs.csv                   the student runs used, one row each, with their best dev score

Everything is written to a temporary folder next to --out and renamed into place at the end, so a failed
report leaves no half-written folder (and a previous report stays until the new one is complete).

>>> report_command("quickstart", None, None, "report", "html,md,csv", None)     # doctest: +SKIP
0
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kdplatform.paths import safe_file_name
from kdplatform.report import figures as F
from kdplatform.report.collect import (AXIS_LABELS, CONFIG_AXES, DEFAULT_HISTORY_KEYS, ReportData, ReportError,
                                       collect_runs, default_tracking_uri, redact, run_url)
from kdplatform.report.dashboards import Dashboard, apply_filters, describe_filters, load_dashboards
from kdplatform.report.frontier import frontier_figures, frontier_table
from kdplatform.report.tables import accuracy_table

FORMATS = ("html", "png", "svg", "pdf", "tex", "md", "csv")
IMAGE_FORMATS = ("png", "svg", "pdf")
TABLE_FORMATS = ("html", "md", "tex", "csv")
MARKER = ".kdplatform-report"  # marks a folder this command wrote (so it may replace it)
PLOTLY_JS = "plotly.min.js"  # beside index.html: the page itself stays sized to the sweep's data


def parse_formats(text: str | None) -> list[str]:
    """'html,png,md' -> ['html', 'png', 'md']; 'all' or empty -> every format."""
    if not text or text.strip() == "all":
        return list(FORMATS)
    wanted = [f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()]
    bad = [f for f in wanted if f not in FORMATS]
    if bad:
        raise ReportError(f"unknown --format {', '.join(bad)}; choose from {','.join(FORMATS)} (or 'all')")
    return list(dict.fromkeys(wanted))


def find_chromium() -> str | None:
    """The Chromium kaleido would use for static export (BROWSER_PATH, PATH, kaleido's own download)."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if Path(env).exists() else None
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 - no choreographer, or an API change: fall back to PATH
        for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
            path = shutil.which(name)
            if path:
                return path
    return None


# ----------------------------------------------------------------------------------------- building
@dataclass
class Block:
    """One item of a page: a table, a group of figures, or a note saying why there is nothing."""

    anchor: str
    title: str
    kind: str
    html: str = ""
    figures: list[F.Figure] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)  # (label, relative path)
    note: str = ""
    table: object | None = None  # the AccuracyTable of an accuracy_table item
    table_name: str = ""


@dataclass
class Section:
    anchor: str
    dashboard: Dashboard
    blocks: list[Block]
    notes: list[str]
    n_runs: int


@dataclass
class Report:
    sections: list[Section]
    data: ReportData
    notes: list[str]

    @property
    def figures(self) -> list[F.Figure]:
        return [f for s in self.sections for b in s.blocks for f in b.figures]

    @property
    def tables(self) -> list[Block]:
        return [b for s in self.sections for b in s.blocks if b.kind == "accuracy_table" and not b.note]


def _unique(name: str, used: set[str]) -> str:
    base, i = name, 2
    while name in used:
        name, i = f"{base}-{i}", i + 1
    used.add(name)
    return name


DEFAULT_TITLES = {"accuracy_table": "Accuracy comparison", "score_curves": "Train vs dev score (whole run)",
                  "distill_loss_curves": "Distillation loss, train vs dev (whole run)",
                  "stage_curves": "Per stage: train vs dev of the stage's own objective",
                  "stage_gap_bars": "Gap at the end of each stage", "gap_bars": "Gap at the end of training",
                  "bits": "Score against weight bits", "heatmap": "Heatmap", "parallel_coordinates":
                  "All axes against the best dev score", "param_importance": "Parameter importance (Optuna)",
                  "frontier": "Dev score against cost", "frontier_table": "Pareto front"}


def _item_title(item) -> str:
    if item.title:
        return item.title
    if item.kind == "gap_bars":
        return f"Gap at the end of training ({item.metric})"
    if item.kind == "bits" and item.x == "size":
        return "Score against model size"
    if item.kind == "heatmap":
        return f"{AXIS_LABELS.get(item.x, item.x)} x {AXIS_LABELS.get(item.y, item.y)}"
    if item.kind in ("frontier", "frontier_table"):
        return f"{DEFAULT_TITLES[item.kind]} ({item.x}, {item.format.replace('_', ' ')})"
    return DEFAULT_TITLES[item.kind]


def build_item(item, data: ReportData) -> tuple[str, list[F.Figure] | object]:
    """('table', AccuracyTable) or ('figures', [Figure]); raises figures.NoData when nothing applies."""
    if item.kind == "accuracy_table":
        try:
            return "table", accuracy_table(data, rows=item.rows, metric=item.metric, select=item.select,
                                           caption=item.title or "", value=item.value, baseline=item.baseline)
        except ValueError as e:
            raise F.NoData(str(e)) from e
    if item.kind == "score_curves":
        return "figures", F.score_curves(data, item.group_by, item.metric)
    if item.kind == "distill_loss_curves":
        return "figures", F.distill_loss_curves(data, item.group_by)
    if item.kind == "stage_curves":
        return "figures", F.stage_curves(data, item.group_by)
    if item.kind == "stage_gap_bars":
        return "figures", F.stage_gap_bars(data, item.group_by)
    if item.kind == "gap_bars":
        return "figures", F.gap_bars(data, item.group_by, item.metric)
    if item.kind == "bits":
        return "figures", F.bits_figures(data, item.x)
    if item.kind == "heatmap":
        return "figures", F.heatmaps(data, item.x, item.y)
    if item.kind == "parallel_coordinates":
        return "figures", F.parallel_coordinates(data)
    if item.kind == "param_importance":
        return "figures", F.param_importance(data)
    if item.kind == "frontier":
        return "figures", frontier_figures(data, item.x, item.format)
    if item.kind == "frontier_table":
        return "table", frontier_table(data, item.x, item.format)
    raise AssertionError(item.kind)


def build_report(data: ReportData, dashboards: list[Dashboard]) -> Report:
    """Build every table and figure in memory (nothing is written yet)."""
    used_anchors: set[str] = set()
    used_figs: set[str] = set()
    sections = []
    for dash in dashboards:
        page, page_notes = apply_filters(data, dash.filters)
        anchor = _unique(safe_file_name(dash.name or "page"), used_anchors)
        blocks = []
        for item in dash.items:
            title = _item_title(item)
            sub, notes = apply_filters(page, item.filters)
            block = Block(_unique(f"{anchor}-{item.kind.replace('_', '-')}", used_anchors), title, item.kind)
            if sub.runs.empty:
                block.note = "; ".join(notes) or "no runs match the filters"
            else:
                try:
                    what, built = build_item(item, sub)
                except F.NoData as e:
                    block.note = str(e)
                else:
                    if what == "table":
                        block.html = built.to_html()
                        block.table = built
                        block.table_name = _unique(safe_file_name(f"{anchor}-{item.name}"), used_figs)
                    else:
                        for fig in built:
                            fig.name = _unique(safe_file_name(f"{anchor}-{fig.name}"), used_figs)
                        block.figures = built
            if item.filters:
                block.title += f" ({describe_filters(item.filters)})"
            blocks.append(block)
        sections.append(Section(anchor, dash, blocks, page_notes, len(page.runs)))
    return Report(sections, data, list(data.notes))


# ------------------------------------------------------------------------------------------ writing
def export_images(figs: list[F.Figure], folder: Path, formats: list[str]) -> list[str]:
    """Write every figure in every image format in one kaleido batch; returns the relative paths."""
    import plotly.io as pio

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(f.fig, folder / f"{f.name}.{fmt}") for f in figs for fmt in formats]
    if jobs:  # kaleido ignores the layout's size unless it is passed explicitly
        pio.write_images([j[0] for j in jobs], [j[1] for j in jobs],
                         width=[j[0].layout.width or F.WIDTH for j in jobs],
                         height=[j[0].layout.height or F.HEIGHT for j in jobs])
    return [str(j[1]) for j in jobs]


def _runs_frame(data: ReportData) -> pd.DataFrame:
    cols = ["run_name", "task", *CONFIG_AXES, "seed", "best_score", "best_step", "final_score", "status",
            "run_id", "experiment"]
    df = data.runs[cols].copy()
    df["url"] = [run_url(data.ui_base, e, r) or "" for e, r in zip(data.runs.experiment_id, data.runs.run_id)]
    return df


def write_report(report: Report, folder: Path, formats: list[str], chromium: str | None,
                 console=None) -> dict:
    """Write the report into `folder` (a fresh temporary folder); returns counts for the summary."""
    tables_dir, figs_dir = folder / "tables", folder / "figures"
    written = {"tables": 0, "figures": len(report.figures), "images": 0}
    table_formats = [f for f in formats if f in TABLE_FORMATS]
    for s in report.sections:
        for b in s.blocks:
            table = b.table
            if table is None or not table_formats:
                continue
            tables_dir.mkdir(exist_ok=True)
            writers = {"html": table.to_html, "md": table.to_markdown, "tex": table.to_latex, "csv": table.to_csv}
            for fmt in table_formats:
                path = tables_dir / f"{b.table_name}.{fmt}"
                path.write_text(writers[fmt]() + ("\n" if fmt == "md" else ""), encoding="utf-8")
                b.files.append((fmt.upper() if fmt != "tex" else "LaTeX", f"tables/{path.name}"))
            written["tables"] += 1
    if "csv" in formats:
        _runs_frame(report.data).to_csv(folder / "runs.csv", index=False)

    image_formats = [f for f in formats if f in IMAGE_FORMATS]
    if image_formats and report.figures:
        if chromium is None:
            msg = ("no Chromium found: PNG/SVG/PDF export skipped (HTML and tables are written). Install it "
                   "(Debian: apt-get install chromium) or set BROWSER_PATH")
            report.notes.append(msg)
            if console is not None:
                console.print(msg, style="yellow", highlight=False, markup=False)
        else:
            try:
                export_images(report.figures, figs_dir, image_formats)
            except Exception as e:  # noqa: BLE001 - a broken browser must not cost the HTML and tables
                msg = f"static image export failed ({type(e).__name__}: {str(e)[:300]}); HTML and tables written"
                report.notes.append(msg)
                if console is not None:
                    console.print(msg, style="yellow", highlight=False, markup=False)
            else:
                for f in report.figures:
                    f.files = [(fmt.upper(), f"figures/{f.name}.{fmt}") for fmt in image_formats]
                written["images"] = len(report.figures) * len(image_formats)
    if "html" in formats:
        if report.figures:
            from plotly.offline import get_plotlyjs

            (folder / PLOTLY_JS).write_text(get_plotlyjs(), encoding="utf-8")
        (folder / "index.html").write_text(render_html(report), encoding="utf-8")
    (folder / MARKER).write_text("written by kdplatform report\n", encoding="utf-8")
    return written


# ---------------------------------------------------------------------------------------------- HTML
PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header,main,nav{max-width:1100px;margin:0 auto;padding:0 1.5rem}
header{padding-top:1rem} h1{font-size:1.6rem} h3{margin-top:1.8rem}
h2{border-bottom:2px solid #ddd;padding-bottom:.3rem;margin-top:2.5rem}
.meta{color:#555;font-size:.9rem} .files{font-size:.85rem;color:#555} .files a{margin-right:.6rem}
.note{color:#8a6d3b;background:#fcf8e3;padding:.4rem .7rem;border-radius:4px;font-size:.9rem}
nav ul{font-size:.9rem;line-height:1.5}
.howto{color:#555;font-size:.85rem;max-width:60rem}
table.kdp-table,table.runs{border-collapse:collapse;font-size:.88rem;margin:.5rem 0}
table.kdp-table td,table.kdp-table th,table.runs td,table.runs th{border-bottom:1px solid #ddd;padding:.25rem .6rem;
  text-align:center}
table.runs td:first-child{text-align:left}
.figure{background:#fff;border:1px solid #e5e5e5;border-radius:6px;margin:1rem 0;padding:.3rem}
details summary{cursor:pointer;font-weight:600}
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>{{ css }}</style>
{% if plotlyjs %}<script type="text/javascript" src="{{ plotlyjs }}"></script>{% endif %}
</head>
<body>
<header>
<h1>{{ title }}</h1>
<p class="meta">{{ n_runs }} student runs ({{ n_tasks }} tasks, {{ n_methods }} methods) from {{ store }};
generated {{ generated }}.{% if not ui_base %} Runs are not linked: the store is not an MLflow server.{% endif %}</p>
{% for n in notes %}<p class="note">{{ n }}</p>{% endfor %}
</header>
<nav><h2>Contents</h2><ul>
{% for s in sections %}<li><a href="#{{ s.anchor }}">{{ s.dashboard.title }}</a><ul>
{% for b in s.blocks %}{% if not b.note %}<li><a href="#{{ b.anchor }}">{{ b.title }}</a>{% for f in b.figures %}{% if loop.first %}: {% endif %}<a href="#{{ f.name }}">{{ f.title }}</a>{% if not loop.last %}, {% endif %}{% endfor %}</li>{% endif %}
{% endfor %}</ul></li>
{% endfor %}<li><a href="#runs">Runs</a></li>{% if not_drawn %}<li><a href="#not-drawn">Not drawn</a></li>{% endif %}</ul></nav>
<main>
{% for s in sections %}
<section id="{{ s.anchor }}">
<h2>{{ s.dashboard.title }}</h2>
{% if s.dashboard.description %}<p>{{ s.dashboard.description }}</p>{% endif %}
{% if s.dashboard.filters %}<p class="meta">Runs: {{ filters(s.dashboard.filters) }} ({{ s.n_runs }} runs).</p>{% endif %}
{% for n in s.notes %}<p class="note">{{ n }}</p>{% endfor %}
{% for b in s.blocks %}{% if not b.note %}
<h3 id="{{ b.anchor }}">{{ b.title }}</h3>
{% if b.html %}{{ b.html | safe }}{% endif %}
{% if b.files %}<p class="files">Download: {% for label, path in b.files %}<a href="{{ path }}">{{ label }}</a>{% endfor %}</p>{% endif %}
{% for f in b.figures %}
<div class="figure" id="{{ f.name }}">
{{ figure_html(f) | safe }}
{% if f.files %}<p class="files">Download: {% for label, path in f.files %}<a href="{{ path }}">{{ label }}</a>{% endfor %}</p>{% endif %}
</div>
{% endfor %}
{% endif %}{% endfor %}
</section>
{% endfor %}
<section id="runs">
<h2>Runs</h2>
<details><summary>{{ n_runs }} student runs{% if ui_base %} (linked to the MLflow UI){% endif %}</summary>
<table class="runs"><thead><tr><th>Run</th><th>Task</th>{% for c in axis_labels %}<th>{{ c }}</th>{% endfor %}<th>Seed</th><th>Best dev score</th><th>at step</th><th>Final dev score</th><th>Status</th></tr></thead>
<tbody>
{% for r in runs %}<tr><td>{% if r.url %}<a href="{{ r.url }}" target="_blank" rel="noopener">{{ r.run_name }}</a>{% else %}{{ r.run_name }} <span class="meta">{{ r.run_id }}</span>{% endif %}</td><td>{{ r.task }}</td>{% for c in axes %}<td>{{ r[c] or "–" }}</td>{% endfor %}<td>{{ r.seed }}</td><td>{{ "%.2f" | format(r.best_score * 100) }}</td><td>{{ r.best_step }}</td><td>{{ "%.2f" | format(r.final_score * 100) }}</td><td>{{ r.status }}</td></tr>
{% endfor %}</tbody></table></details>
</section>
{% if not_drawn %}<section id="not-drawn">
<h2>Not drawn</h2>
<ul class="meta">{% for title, why in not_drawn %}<li>{{ title }}: {{ why }}</li>
{% endfor %}</ul>
</section>{% endif %}
</main>
</body>
</html>
"""


def _figure_html(f: F.Figure) -> str:
    return f.fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{f.name}",
                         config={"displaylogo": False, "responsive": True})


def not_drawn(report: Report) -> list[tuple[str, str]]:
    """(title, why) of each block without data: listed once at the end of the page, not drawn empty."""
    out = []
    for s in report.sections:
        for b in s.blocks:
            if b.note:
                title = b.title if len(report.sections) == 1 else f"{s.dashboard.title}: {b.title}"
                out.append((title, b.note))
    return out


def store_label(uri: str) -> str:
    """The store as the page shows it: a SQLite file under the working folder by its relative path."""
    uri = redact(uri)
    prefix = "sqlite:///"
    if uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):])
        try:
            return prefix + str(path.relative_to(Path.cwd()))
        except ValueError:
            return uri
    return uri


def render_html(report: Report) -> str:
    import jinja2
    from markupsafe import Markup

    data = report.data
    env = jinja2.Environment(autoescape=True)
    template = env.from_string(PAGE)
    runs = _runs_frame(data)
    axes = [a for a in CONFIG_AXES if (runs[a] != "").any()]
    experiments = ", ".join(sorted(data.experiments.values()))
    drawn = [s for s in report.sections if any(not b.note for b in s.blocks)]
    return template.render(
        title=f"kdplatform report: {experiments}", css=Markup(PAGE_CSS),
        plotlyjs=PLOTLY_JS if report.figures else None,
        n_runs=len(data.runs), n_tasks=data.runs.task.nunique(), n_methods=data.runs.method.nunique(),
        store=store_label(data.tracking_uri),
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), ui_base=data.ui_base, notes=report.notes,
        sections=drawn, not_drawn=not_drawn(report), figure_html=_figure_html, filters=describe_filters,
        runs=runs.to_dict("records"),
        axes=axes, axis_labels=[AXIS_LABELS[a] for a in axes])


# --------------------------------------------------------------------------------------------- command
def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished report into place; a previous report is removed only once the new one is there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ReportError(f"--out {out} exists and is not a kdplatform report folder: choose a new or empty "
                          f"folder (a previous report is replaced, other folders are never touched)")


def generate(tracking_uri: str, out: str | os.PathLike, experiment: str | None = None, sweep: str | None = None,
             dashboards: list[str] | None = None, formats: str | list[str] = "all", console=None) -> dict:
    """Collect, build and write a report; returns a summary dict. Raises ReportError on user mistakes."""
    fmts = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    out = Path(out).expanduser().resolve()
    _check_out(out)
    dashes = load_dashboards(dashboards)
    keys = list(dict.fromkeys([*DEFAULT_HISTORY_KEYS, *[k for d in dashes for k in d.history_keys()]]))
    data = collect_runs(tracking_uri, experiment=experiment, sweep=sweep, history_keys=keys)
    report = build_report(data, dashes)
    chromium = find_chromium() if any(f in IMAGE_FORMATS for f in fmts) else None

    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the report is an ordinary folder
    try:
        written = write_report(report, tmp, fmts, chromium, console)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents this call created, innermost first
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return {**written, "out": str(out), "runs": len(data.runs), "notes": report.notes,
            "index": str(out / "index.html") if "html" in fmts else None}


def report_command(experiment: str | None, sweep: str | None, dashboard: list[str] | None, out: str,
                   formats: str, tracking_uri: str | None) -> int:
    """The CLI entry: returns the exit code (0 ok, 2 user-facing problem) and prints with rich."""
    from rich.console import Console
    from rich.markup import escape

    console, err = Console(), Console(stderr=True)
    uri = default_tracking_uri(tracking_uri)
    try:
        summary = generate(uri, out, experiment=experiment, sweep=sweep, dashboards=dashboard, formats=formats,
                           console=err)
    except ReportError as e:
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    for n in summary["notes"]:
        if not n.startswith(("no Chromium", "static image export failed")):
            console.print(f"note: {n}", highlight=False, markup=False)
    where = summary["index"] or summary["out"]
    console.print(f"[green]report written:[/green] {where} ({summary['runs']} runs, {summary['tables']} tables, "
                  f"{summary['figures']} figures, {summary['images']} images)", highlight=False)
    return 0
