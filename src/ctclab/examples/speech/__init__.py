"""Speech with known word boundaries: espeak-ng sentences, a small character CTC acoustic model
trained on CPU, and word boundary error measured through :mod:`ctclab.speech`'s audio pipeline.

``python -m ctclab.examples.speech data|train|eval|compare``; needs espeak-ng (the program),
the ``speech`` extra (soundfile, soxr) and matplotlib for the pictures.
"""
