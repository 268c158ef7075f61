"""The one reader of the JSON files in a checkpoint folder (config.json, processor and tokenizer configs).

Torch-free and below everything that reads such files (weights.py, processing/), so a bad file gives
the same ConfigError wherever it is read.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError


def read_json_object(path: Path, missing_ok: bool = False) -> dict:
    """The JSON object held by the file `path`.

    missing_ok: a missing file reads as {} (optional files such as tokenizer_config.json); otherwise
    the caller has checked that it exists. Raises ConfigError for a file that cannot be read, is not
    valid JSON (or UTF-8), or holds something other than an object.
    """
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data
