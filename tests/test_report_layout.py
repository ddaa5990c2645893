"""The terminal report at 80 columns: tables too wide for the terminal are drawn compact, so every cell stays
whole on one line instead of wrapping over several (what a bordered table of ten columns did)."""

from __future__ import annotations

import io

from rich.console import Console
from test_report import synthetic_rows, write_results

from dfc_ray.report import print_report, sections, write_report


def rendered(report: dict, width: int) -> str:
    """The full report (`dfc-ray report --full`): every table."""
    out = io.StringIO()
    print_report(report, Console(file=out, width=width, color_system=None), full=True)
    return out.getvalue()


def test_an_80_column_terminal_keeps_every_cell_whole(tmp_path):
    report = write_report(write_results(tmp_path / "run", synthetic_rows()))
    narrow, wide = rendered(report, 80), rendered(report, 240)
    lines = narrow.splitlines()
    assert max(len(line) for line in lines) <= 80
    cells = {cell for section in sections(report)[1:] for row in section.rows for cell in row if 0 < len(cell) <= 70}
    broken = [cell for cell in cells if not any(cell in line for line in lines)]
    assert not broken, broken[:5]
    assert len(lines) < 0.5 * len(rendered_bordered(report, 80).splitlines())
    assert "┃" in wide  # a wide terminal keeps the bordered tables


def rendered_bordered(report: dict, width: int) -> str:
    """The report as bordered tables whatever the width: what an 80-column terminal used to get."""
    from dfc_ray.report.render import _table

    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None)
    for i, section in enumerate(sections(report)):
        console.print(_table(section, headed=i > 0))
    return out.getvalue()
