"""stability: the linear stability regions of the schemes (paper section 3) and their table.

A thin wrapper around revkernels.stability (imported here, when the benchmark runs): its
plot_stability_regions draws the PNG, its stability_table gives the rows of the CSV and markdown.
The figures are closed-form and device independent; the device is named only for uniformity.
"""
from .common import header, markdown_table, write_csv


def _cell(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run(ctx) -> str:
    from .. import stability                     # lazy: the rest of the suite runs without it

    rows = stability.stability_table()
    columns = list(rows[0])
    write_csv(ctx.path("csv"), rows, columns)
    stability.plot_stability_regions(str(ctx.path("png")))
    text = (header(ctx, "Linear stability of the reversible schemes") + "\n\n"
            "Per-step growth of the forward recurrence (rho_forward, max |root|) and of its inverse "
            "(rho_backward), and whether each is stable, at representative points (closed form, "
            "revkernels.stability; h_lam is z = c*lam, or alpha*beta for hamiltonian).\n\n"
            + markdown_table(columns, [[_cell(r[c]) for c in columns] for r in rows]) + "\n")
    ctx.path("md").write_text(text)
    return text
