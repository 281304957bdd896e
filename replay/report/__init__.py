"""The audit report of an experiment: an HTML page (self-contained: inline CSS, inline SVG plots)
and a Markdown twin with PNG plots, from an experiment's results.json."""

from .render import load_results, write_report

__all__ = ["load_results", "write_report"]
