"""The report's page plan: its sections in order and the figures they show, each a named
drawing call into :mod:`gradlake.report.figures` (drawn later, in one loop); and the words the
sections share (pair titles, normalisation labels, the relations of two samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from gradlake.errors import InputError
from gradlake.report.html import Image, Section

FIGURES = "figures"

OBSERVABLE_NAMES = {"C": "loss", "M": "mass", "E": "energy", "V": "probe"}
NORM_LABELS = {"none": "H (unnormalised)", "row-std": "H (row-std normalised)", "cosine": "H (cosine)"}
RELATION_NAMES = {"same_trajectory": "same trajectory", "same_class": "same class, other trajectory",
                  "other_class": "other classes"}
RELATIONS_TEXT = ("Relations of the two samples: 'same trajectory'; 'same class, other trajectory'; 'other "
                  "classes' (the perturbed sample is in any other class).")
HEATMAP_READING = ("In each heatmap x is the time of the perturbed sample, y the time of the responding "
                   "sample; red = positive H (a descent step on the perturbed sample lowers the response "
                   "observable), blue = negative (it raises it), grey = no sample pairs.")


def pair_title(pair: str) -> str:
    """'MC' -> 'H_MC (response mass, perturbation loss)'."""
    return (f"H_{pair} (response {OBSERVABLE_NAMES.get(pair[0], pair[0])}, "
            f"perturbation {OBSERVABLE_NAMES.get(pair[1], pair[1])})")


def norm_label(norm: str) -> str:
    return NORM_LABELS.get(norm, f"H ({norm})")


@dataclass
class Plan:
    """The report's sections and the figures they show (file name -> drawing call)."""

    normalizations: tuple[str, ...] = ()  # of the influence figures
    sections: list[Section] = field(default_factory=list)
    draws: dict[str, Callable[..., None]] = field(default_factory=dict)  # called with out=<file>

    def section(self, anchor: str, title: str, intro: str = "") -> Section:
        section = Section(anchor, title, intro)
        self.sections.append(section)
        return section

    def figure(self, section: Section, name: str, caption: str, draw: Callable[..., None],
               group: str = "", **kwargs: Any) -> None:
        """Add figure ``figures/<name>.png``, drawn by ``draw(out, **kwargs)``."""
        src = f"{FIGURES}/{safe_name(name)}.png"
        if src in self.draws:
            raise ValueError(f"report: figure {src} planned twice")  # a bug in a section module
        self.draws[src] = partial(draw, **kwargs)
        alt = str(kwargs.get("title", caption)).replace("\n", ", ")
        section.images.append(Image(src, caption, alt=alt, group=group))

    def variants(self, coords: dict[str, list]) -> list[tuple[int, str, int, str]]:
        """(pair index, pair, normalisation index, normalisation) of the figures to draw."""
        return [(p, pair, coords["normalization"].index(norm), norm) for p, pair in enumerate(coords["pair"])
                for norm in self.normalizations]


def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits and ``._-`` replaced by ``_``."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def choose_normalizations(available: list[str], wanted=None) -> tuple[str, ...]:
    """The normalisations to draw: ``wanted`` (checked), else row-std (the paper's) when the
    reduce has it, else its first."""
    if wanted:
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise InputError(f"normalizations: {unknown[0]!r} is not in the reduce's results "
                             f"(it has {', '.join(available)})")
        return tuple(wanted)
    return ("row-std",) if "row-std" in available else tuple(available[:1])

