"""Worked examples that use ctclab end to end (``python -m ctclab.examples.ocr --help``)."""
