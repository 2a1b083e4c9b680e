"""Experiment reports: a Markdown file and a self-contained HTML file (figures embedded).

A report is a list of sections of prose, tables, figures (PNGs made by ``plots``) and the
trainings behind them. The HTML has no scripts and no external resources, so it opens
anywhere, offline. Every table is also written as ``tables/<name>.csv`` and ``.tex`` (a
booktabs tabular, to paste into a LaTeX report); both reports link them.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klayer import __version__
from klayer.training.runfolder import write_text


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    caption: str
    path: Path  # a PNG inside the report folder


@dataclass
class Section:
    key: str  # the experiment's name
    title: str = ""
    question: str = ""  # the report item it answers
    text: list[str] = field(default_factory=list)  # paragraphs, generated commentary
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    runs: Table | None = None  # label, overrides, seeds, wall time
    wall_seconds: float = 0.0
    facts: dict[str, float] = field(default_factory=dict)  # key numbers, for summaries


@dataclass
class Report:
    title: str
    sections: list[Section]
    quick: bool
    command: str
    seeds: int
    created: str

    def environment(self) -> str:
        return (f"klayer {__version__}, NumPy {np.__version__}, Python "
                f"{platform.python_version()}, {platform.system()} {platform.machine()}")


QUICK_NOTE = ("**This is a quick run** (`--quick`): a slice of the data and very short "
              "trainings, for trying things and for tests. Its numbers say nothing about "
              "the methods; run without `--quick` for the real report.")


def to_markdown(report: Report, folder: Path) -> str:
    """The report as Markdown; figure and table-file links are relative to ``folder``."""
    names = {id(t): name for name, t in table_files(report)}
    out = [f"# {report.title}", "", *([QUICK_NOTE, ""] if report.quick else []),
           f"Command: `{report.command}`  ", f"Created: {report.created}, seeds per "
           f"configuration: {report.seeds}  ", f"Environment: {report.environment()}", ""]
    for s in report.sections:
        out += [f"## {s.title}", "", f"*{s.question}*", ""]
        for p in s.text:
            out += [p, ""]
        for t in s.tables:
            out += _md_table(t, names[id(t)])
        for f in s.figures:
            out += [f"![{f.caption}]({f.path.relative_to(folder).as_posix()})", "",
                    f"*{f.caption}*", ""]
        if s.runs is not None:
            out += _md_table(s.runs, names[id(s.runs)])
        if s.wall_seconds:
            out += [f"Wall time of this section: {s.wall_seconds:.0f} s", ""]
    return "\n".join(out)


def _md_table(t: Table, name: str) -> list[str]:
    rows = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
    return [f"**{t.title}**", "", "| " + " | ".join(t.header) + " |",
            "|" + "---|" * len(t.header), *rows, "",
            f"Table as [CSV]({TABLES}/{name}.csv) or [LaTeX]({TABLES}/{name}.tex)", ""]


CSS = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ccc; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } figure { margin: 1em 0; } img { max-width: 100%; }
figcaption { font-style: italic; color: #555; } .quick { background: #fff3cd;
  border: 1px solid #e0c060; padding: 0.6em 1em; } .meta { color: #555; font-size: 0.9em; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def to_html(report: Report) -> str:
    """The report as one HTML file with the figures embedded as data URIs."""
    e = html.escape
    names = {id(t): name for name, t in table_files(report)}
    quick = [f'<p class="quick">{_inline(QUICK_NOTE)}</p>'] if report.quick else []
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(report.title)}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>{e(report.title)}</h1>", *quick,
             f'<p class="meta">Command: <code>{e(report.command)}</code><br>Created: '
             f"{e(report.created)}, seeds per configuration: {report.seeds}<br>"
             f"Environment: {e(report.environment())}</p>"]
    for s in report.sections:
        parts += [f'<h2 id="{e(s.key)}">{e(s.title)}</h2>', f"<p><em>{e(s.question)}</em></p>"]
        parts += [f"<p>{_inline(p)}</p>" for p in s.text]
        parts += [_html_table(t, names[id(t)]) for t in s.tables]
        for f in s.figures:
            data = base64.b64encode(f.path.read_bytes()).decode()
            parts.append(f'<figure><img alt="{e(f.caption)}" src="data:image/png;base64,'
                         f'{data}"><figcaption>{e(f.caption)}</figcaption></figure>')
        if s.runs is not None:
            parts.append(_html_table(s.runs, names[id(s.runs)]))
        if s.wall_seconds:
            parts.append(f'<p class="meta">Wall time of this section: {s.wall_seconds:.0f} s</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(t: Table, name: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    link = e(f"{TABLES}/{name}")
    return (f"<p><strong>{e(t.title)}</strong></p><table><tr>{head}</tr>{body}</table>"
            f'<p class="meta">Table as <a href="{link}.csv">CSV</a> or '
            f'<a href="{link}.tex">LaTeX</a></p>')


def _inline(text: str) -> str:
    """Escape, then render **bold** and `code` spans (the only Markdown the prose uses)."""
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text), flags=re.S)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out, flags=re.S)


TABLES = "tables"  # the report folder's subfolder for them
# LaTeX's special characters, and the non-ASCII ones the report uses, as LaTeX source
LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
         "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
         "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
         "|": r"\textbar{}", "±": r"$\pm$", "−": "$-$", "×": r"$\times$", "≈": r"$\approx$",
         "≤": r"$\leq$", "≥": r"$\geq$", "→": r"$\to$", "σ": r"$\sigma$",
         "λ": r"$\lambda$", "η": r"$\eta$", "γ": r"$\gamma$", "β": r"$\beta$",
         "θ": r"$\theta$", "μ": r"$\mu$"}


def table_files(report: Report) -> list[tuple[str, Table]]:
    """Every table with its file name: ``<section>-<first words of the title>``, or
    ``<section>-trainings`` for the trainings behind it; numbered where two would clash."""
    named: dict[str, Table] = {}
    for s in report.sections:
        titled = [(t, re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", t.title.lower())[:5])
                  for t in s.tables] + ([(s.runs, ["trainings"])] if s.runs is not None else [])
        for t, words in titled:
            base = "-".join([s.key, *words])
            name, n = base, 2
            while name in named:
                name, n = f"{base}-{n}", n + 1
            named[name] = t
    return list(named.items())


def to_csv(t: Table) -> str:
    """The header and rows as CSV (the title is the file's name)."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([t.header, *t.rows])
    return text.getvalue()


def to_latex(t: Table) -> str:
    """A booktabs tabular (needs ``\\usepackage{booktabs}``), cells escaped, title in a comment."""
    def line(cells: list[str]) -> str:
        return " & ".join("".join(LATEX.get(ch, ch) for ch in c) for c in cells) + r" \\"

    return "\n".join([f"% {t.title} (needs \\usepackage{{booktabs}})",
                      r"\begin{tabular}{" + "l" * len(t.header) + "}", r"\toprule",
                      line(t.header), r"\midrule", *(line(r) for r in t.rows),
                      r"\bottomrule", r"\end{tabular}", ""])


def write_tables(report: Report, folder: Path) -> list[Path]:
    """Write ``folder/tables/<name>.csv`` and ``.tex`` for every table, each atomically
    (OutputError naming the file if one cannot be written); the paths written."""
    written = []
    for name, t in table_files(report):
        for suffix, text in ((".csv", to_csv(t)), (".tex", to_latex(t))):
            path = folder / TABLES / f"{name}{suffix}"
            write_text(path, text)
            written.append(path)
    return written
