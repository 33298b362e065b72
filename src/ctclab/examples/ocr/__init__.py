"""Text-line recognition on rendered text: a real CTC task with exact ground truth for timings.

``python -m ctclab.examples.ocr train|eval|compare``; needs Pillow (``pip install ctclab[examples]``).
"""
