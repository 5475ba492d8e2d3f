"""The bit-allocation report as a picture: an SVG bar chart of the width chosen for each unit.

One bar per unit, in report order (so a layer's experts sit side by side), its height the chosen width and
its colour the width; a dashed line marks the budget. The title compares the objective with that of each
uniform width, greying out and labelling those over the budget (they are no option). Plain SVG text, so a
plan folder needs no plotting library to carry it and any browser shows it.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

COLOURS = {2: "#d73027", 3: "#fc8d59", 4: "#91bfdb", 8: "#4575b4"}  # other widths: grey
GREY = "#999999"
WIDTH, HEIGHT, MARGIN = 720, 240, 40


def allocation_svg(report: dict) -> str:
    """The chart of ``report`` (the ``bit_allocation`` entry of a pass report: its table, budget, averages)."""
    table = report["table"]
    top = max(max(row["bits"] for row in table), report["budget"])
    plot_width, plot_height = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN
    bar = plot_width / len(table)

    def y(bits: float) -> float:
        return MARGIN + plot_height * (1 - bits / top)

    comparison = []
    for width, uniform in report["uniform"].items():
        label = escape(f"uniform {width}: {uniform['objective']:.4g}")
        over = uniform["average_bits"] > report["budget"] + 1e-9  # the pass's tolerance
        comparison.append(f'<tspan fill="{GREY}">{label} (over budget)</tspan>' if over else label)
    title = (f"bit allocation: {len(table)} units, budget {report['budget']} bits, average "
             f"{report['average_bits']:.3f}; objective {report['objective']:.4g}")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
        f'font-size="10">',
        f'<text x="{MARGIN}" y="{MARGIN / 2}">{escape(title)} ({", ".join(comparison)})</text>',
    ]
    for index, row in enumerate(table):
        colour = COLOURS.get(row["bits"], GREY)
        parts.append(f'<rect x="{MARGIN + index * bar:.2f}" y="{y(row["bits"]):.2f}" width="{max(bar * 0.9, 0.5):.2f}" '
                     f'height="{MARGIN + plot_height - y(row["bits"]):.2f}" fill="{colour}">'
                     f'<title>{escape(row["unit"])}: {row["bits"]} bits</title></rect>')
    for bits in sorted({row["bits"] for row in table}):
        parts.append(f'<text x="{MARGIN - 4}" y="{y(bits) + 3:.2f}" text-anchor="end">{bits}</text>')
    budget_y = y(report["budget"])
    parts.append(f'<line x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{budget_y:.2f}" y2="{budget_y:.2f}" '
                 'stroke="black" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{WIDTH - MARGIN}" y="{budget_y - 3:.2f}" text-anchor="end">budget</text>')
    parts.append(f'<text x="{MARGIN}" y="{HEIGHT - MARGIN / 2}">units in report order (hover a bar for its name)</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
