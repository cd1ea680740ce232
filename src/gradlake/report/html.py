"""The report's index.html: a plain, self-contained page (no scripts, no network assets)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h3 { font-size: 1.05em; margin-top: 1.5em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .92em; color: #444; margin-top: .3em; }
table { border-collapse: collapse; font-size: .92em; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } .note { color: #8a5a00; background: #fff8e6; padding: .5em .8em; }
nav li { margin: .15em 0; }
"""


@dataclass(frozen=True)
class Image:
    """One figure: its file name (relative to index.html) and a caption telling how to read it."""

    src: str
    caption: str
    alt: str = ""
    group: str = ""  # a sub-heading (e.g. the checkpoint); shown when it changes


@dataclass
class Table:
    """A table of numbers with a caption that says what they are."""

    caption: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]


def _grid(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table>\n<caption>{html.escape(t.caption)}</caption>\n<tr>{head}</tr>\n{body}\n</table>"


@dataclass
class Section:
    """A titled part of the report: an intro, figures, and notes (e.g. why an input is missing)."""

    anchor: str
    title: str
    intro: str = ""
    images: list[Image] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _table(rows: Sequence[tuple[str, str]]) -> str:
    body = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>\n{body}\n</table>"


def _section(s: Section) -> str:
    parts = [f'<section id="{html.escape(s.anchor)}">', f"<h2>{html.escape(s.title)}</h2>"]
    if s.intro:
        parts.append(f"<p>{html.escape(s.intro)}</p>")
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in s.notes]
    parts += [_grid(t) for t in s.tables]
    group = ""
    for image in s.images:
        if image.group and image.group != group:
            group = image.group
            parts.append(f"<h3>{html.escape(group)}</h3>")
        src = html.escape(image.src)
        parts.append(
            f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(image.alt or image.caption)}"></a>'
            f"<figcaption>{html.escape(image.caption)}</figcaption></figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def render_index(title: str, provenance: Sequence[tuple[str, str]], sections: Sequence[Section]) -> str:
    """The whole page: title, table of contents, provenance table, then each section."""
    toc = "\n".join(f'<li><a href="#{html.escape(s.anchor)}">{html.escape(s.title)}</a></li>'
                    for s in sections)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<nav><ul>\n<li><a href=\"#provenance\">Provenance</a></li>\n{toc}\n</ul></nav>",
        '<section id="provenance">',
        "<h2>Provenance</h2>",
        _table(provenance),
        "</section>",
        *(_section(s) for s in sections),
        "</body>",
        "</html>",
        "",
    ])
