"""The audit report of an experiment: a self-contained HTML page (inline CSS, inline SVG plots, no
network) and a Markdown twin with PNG plots, from an experiment's results.json.

    from replay.report import load_results, write_report
    html_path, md_path = write_report(load_results("replay-demo"), "replay-demo/report.html")
"""

from .model import load_results
from .render import write_report

__all__ = ["load_results", "write_report"]
