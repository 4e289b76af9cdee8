"""The ``report`` stage: the run as a study, written to RUN/reports/ from its manifests and settings.

``write_report(run)`` reads the evaluate manifest, every student's student.toml and train manifest and
every teacher's teacher.toml (``inputs``), and writes:

- ``tables.md`` and ``tables.csv``: Table 1's shape with each student's gain, the ablations found from
  what differs between students, seeds as mean ± std, the scale sweep, the students (``tables``);
- ``figures/*.png``: Fig. 1, Fig. 3, the training curves and the per-class gain (``figures``), and,
  only when missing and given a benchmark, the models' Fig. 5 and Fig. 7 (``qualitative``);
- ``index.html``: one static page showing all of it, relative links only (``page``).

A run with nothing evaluated or trained yet gets a page saying so.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from spar_pipeline.run import Run
from spar_pipeline.study.inputs import Study, load_study

__all__ = ["write_report", "load_study", "Study"]

log = logging.getLogger(__name__)

REPORTS = "reports"
COMPANIONS = (("summary.md", "run summary"), ("table.md", "evaluate table"))  # written by other commands


def write_report(run: Run, *, datasets: dict[str, str] | None = None, students: Sequence[str] | None = None,
                 images: int = 3, pictures: bool = True, device: str | None = None) -> dict[str, Any]:
    """Write RUN/reports/ (see the module docstring). ``datasets``: name -> root of benchmarks the
    Fig. 5/7 pictures may show; ``students``: the students those show (default: up to three, best
    first); ``images``: how many benchmark images; ``pictures``: False skips Fig. 5/7.
    Returns {"index", "tables_md", "tables_csv", "figures": [urls], "notes": [lines]}."""
    from spar_pipeline.study import figures as figs
    from spar_pipeline.study import page, tables

    study = load_study(run)
    made = tables.all_tables(study)
    drawn, missing = figs.all_figures(study)
    if pictures and study.students and study.rows:
        from spar_pipeline.study.qualitative import qualitative

        more, why = qualitative(study, datasets or {}, students=students, images=images, device=device)
        drawn, missing = drawn + more, missing + why
    elif pictures:
        missing.append("Fig. 5 and Fig. 7 are drawn once the run has a student and evaluate rows.")
    for pic in drawn:
        if pic.png is not None:
            run.write_bytes_atomic(pic.png, REPORTS, "figures", pic.name)
    run.write_bytes_atomic(tables.to_markdown(made, study.notes).encode(), REPORTS, "tables.md")
    run.write_bytes_atomic(tables.to_csv(made).encode(), REPORTS, "tables.csv")
    links = [("tables.md", "tables.md"), ("tables.csv", "tables.csv")]
    links += [(f, label) for f, label in COMPANIONS if run.exists(REPORTS, f)]
    html = page.render(f"SPAR study: {_name(run)}", _facts(study), study.notes, made, drawn, missing, links)
    run.write_bytes_atomic(html.encode(), REPORTS, "index.html")
    log.info("report: %d tables, %d figures, %s", len(made), len(drawn), run.url_for(REPORTS, "index.html"))
    return {"index": run.url_for(REPORTS, "index.html"), "tables_md": run.url_for(REPORTS, "tables.md"),
            "tables_csv": run.url_for(REPORTS, "tables.csv"),
            "figures": [run.url_for(REPORTS, "figures", p.name) for p in drawn], "notes": study.notes + missing}


def _name(run: Run) -> str:
    return run.url.rstrip("/").rsplit("/", 1)[-1]


def _facts(study: Study) -> list[tuple[str, str]]:
    run = study.run
    facts = [("run", run.url)]
    try:
        r = run.recipe
        facts.append(("recipe", f"{r.name} (fingerprint {r.fingerprint}), backbone {r.recipe.backbone}"))
    except Exception as e:  # noqa: BLE001 - a run folder without run.toml still gets its page
        facts.append(("recipe", f"not readable ({type(e).__name__})"))
    facts.append(("teachers", ", ".join(sorted(study.teachers)) or "none listed"))
    facts.append(("students", ", ".join(s.name for s in study.students) or "none yet"))
    datasets = sorted({r["dataset"] for r in study.rows})
    facts.append(("evaluate rows", f"{len(study.rows)}" + (f" over {', '.join(datasets)}" if datasets else "")))
    return facts
