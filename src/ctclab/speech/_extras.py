"""The optional packages of ``ctclab.speech`` (the ``speech`` extra), imported when first needed."""
from __future__ import annotations

import importlib

#: what each optional module is needed for, in the error message
_PURPOSE = {
    "transformers": "to load Hugging Face acoustic models",
    "soundfile": "to read audio files",
    "soxr": "to resample audio",
}


def need(module: str):
    """``import module``, or an ImportError that says what it is for and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        purpose = _PURPOSE.get(module, "")
        raise ImportError(
            f"ctclab.speech needs {module} {purpose}: pip install 'ctclab[speech]'".replace("  ", " ")
        ) from error
