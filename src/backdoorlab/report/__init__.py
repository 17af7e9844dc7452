"""Reports: tables, plots and a self-contained HTML page from a sweep's results store."""

from backdoorlab.report.html import REPORT_NAME, write_report
from backdoorlab.report.tables import detectability, detectability_table, export_rows, summarize, write_exports

__all__ = [
    "REPORT_NAME",
    "detectability",
    "detectability_table",
    "export_rows",
    "summarize",
    "write_exports",
    "write_report",
]
