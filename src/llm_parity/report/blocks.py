"""The report's building blocks: headings, paragraphs, tables, figures. The sections make
them from the verdict; the writers turn them into Markdown or HTML."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str  # may hold **bold** and `code`


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Status:
    """A table cell that is a judgement: coloured in HTML."""

    text: str
    good: bool | None  # None: neutral (e.g. a near-tie)


@dataclass
class Plain:
    """A table cell of free text (a prompt): no markup read in it; ``full`` is the whole
    text when the cell shows a shortened one."""

    text: str
    full: str = ""


@dataclass
class Table:
    header: list[str]
    rows: list[list[Any]]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns
    wide: bool = False  # HTML: let it scroll sideways


@dataclass
class Figure:
    svg: str
    caption: str


@dataclass
class Banner:
    verdict: str
    headline: str
    details: list[str]


@dataclass
class Code:
    text: str


Block = Heading | Para | Bullets | Table | Figure | Banner | Code
