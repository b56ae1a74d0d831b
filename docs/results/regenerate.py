"""Regenerate docs/results/ from the studies' MLflow store, or check that what is committed equals a fresh report.

    python docs/results/regenerate.py            # rewrite, from the committed store docs/results/studies.db
    python docs/results/regenerate.py --check    # compare only; exit 1 with a diff on any difference
    python docs/results/regenerate.py --tracking-uri sqlite:////abs/other.db   # another copy of the store

Rewrite: `kdplatform report` writes each study's tables (Markdown) and figures (PNG) into docs/results/<study>/,
then every block of docs/results/README.md marked

    <!-- table: mpnet_cola/tables/mpnet_cr_ild-accuracy.md -->
    ...
    <!-- /table -->

is replaced by that table, so the write-up's tables are the report's, character for character.
Check: the same reports go to a temporary folder (tables only) and the committed tables and README blocks are
compared with them. The store (params and metrics, no model artifacts, a few MB) is committed beside this
file, so the check runs on a fresh clone and an interrupted study resumes from it (`--resume`).
The earlier MiniLM-L6 studies (minilm_cpu.md) were published without their store and are not regenerated.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_GLUE = HERE.parents[2] / "shared" / "data" / "glue"  # beside the clone, as .ci/run finds it
WRITE_UP = HERE / "README.md"
CR_ILD_PAGE = str(HERE / "dashboards" / "mpnet_cr_ild.yaml")  # one page for the CR-ILD study of every task
# study folder -> (MLflow experiment, report pages)
STUDIES = {
    "mpnet_cola": ("study_mpnet_cola", [CR_ILD_PAGE, "overfitting"]),
    "mpnet_sst2": ("study_mpnet_sst2", [CR_ILD_PAGE, "overfitting"]),
    "mpnet_stsb": ("study_mpnet_stsb", [CR_ILD_PAGE, "overfitting"]),
    "mpnet_kdqat": ("study_mpnet_kdqat", [str(HERE / "dashboards" / "mpnet_kdqat.yaml"), "overfitting"]),
    "mpnet_frontier": ("study_mpnet_frontier", [str(HERE / "dashboards" / "mpnet_frontier.yaml")]),
}
STORE = f"sqlite:///{HERE / 'studies.db'}"
BLOCK = re.compile(r"(<!-- table: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def report(study: str, out: Path, tracking_uri: str, formats: str) -> None:
    """One study's `kdplatform report` into `out` (replaced when complete)."""
    experiment, pages = STUDIES[study]
    cmd = [sys.executable, "-m", "kdplatform.cli", "report", "--experiment", experiment, "--out", str(out),
           "--format", formats, "--tracking-uri", tracking_uri]
    for page in pages:
        cmd += ["--dashboard", page]
    env = dict(os.environ)
    if not env.get("KDP_GLUE_DIR") and SHARED_GLUE.is_dir():  # the majority-class rows read the dev sets
        env["KDP_GLUE_DIR"] = str(SHARED_GLUE)
    subprocess.run(cmd, check=True, env=env)


def splice(write_up: str, tables: Path) -> str:
    """The write-up with every marked block replaced by the table file it names (relative to `tables`)."""
    def body(m: re.Match) -> str:
        text = (tables / m["path"]).read_text(encoding="utf-8")
        return m.group(1) + text.rstrip("\n") + "\n" + m.group(4)
    return BLOCK.sub(body, write_up)


def differences(a: str, b: str, name: str) -> list[str]:
    return list(difflib.unified_diff(a.splitlines(), b.splitlines(), f"committed/{name}", f"fresh/{name}",
                                     lineterm=""))


def check(tracking_uri: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        for study in STUDIES:
            report(study, fresh / study, tracking_uri, "md")
        diff: list[str] = []
        for path in sorted(fresh.glob("*/tables/*.md")):
            name = str(path.relative_to(fresh))
            committed = HERE / name
            old = committed.read_text(encoding="utf-8") if committed.exists() else ""
            diff += differences(old, path.read_text(encoding="utf-8"), name)
        write_up = WRITE_UP.read_text(encoding="utf-8")
        diff += differences(write_up, splice(write_up, fresh), "README.md")
    print("\n".join(diff) if diff else "docs/results equals a fresh report of the store")
    return 1 if diff else 0


def regenerate(tracking_uri: str) -> int:
    for study in STUDIES:
        report(study, HERE / study, tracking_uri, "md,png")
    WRITE_UP.write_text(splice(WRITE_UP.read_text(encoding="utf-8"), HERE), encoding="utf-8")
    print(f"wrote {', '.join(str(HERE / s) for s in STUDIES)} and the tables of {WRITE_UP}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=STORE, help="the studies' MLflow store (default: the committed "
                   "docs/results/studies.db)")
    p.add_argument("--check", action="store_true", help="compare only; exit 1 on any difference")
    args = p.parse_args()
    return check(args.tracking_uri) if args.check else regenerate(args.tracking_uri)


if __name__ == "__main__":
    sys.exit(main())
