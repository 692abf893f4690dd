"""Values going to MLflow: metric scalars, parameter text, sanitised keys, artifact paths and tables.

Each helper checks its argument and raises ``TypeError``/``ValueError`` naming it, so a bad call fails in
the caller (before anything is queued) rather than later inside MLflow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["check_artifact_file", "clean_key", "flatten", "param_text", "rows_frame", "scalar"]

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_KEY = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")


def scalar(name: str, value: Any) -> float:
    """A metric value (number, one-element tensor or array) as a float; ``TypeError`` naming ``name`` else."""
    if hasattr(value, "detach"):
        if value.numel() != 1:
            raise TypeError(f"metric '{name}' must be a scalar; got a tensor of shape {tuple(value.shape)}.")
        value = value.detach().cpu().item()
    elif isinstance(value, np.ndarray):
        if value.size != 1:
            raise TypeError(f"metric '{name}' must be a scalar; got an array of shape {value.shape}.")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"metric '{name}' must be a real number; got {type(value).__name__} {value!r}.")
    return float(value)


def clean_key(name: Any) -> str:
    """``name`` as an MLflow key: characters MLflow rejects become ``_``, at most 250 characters."""
    key = _KEY_BAD_CHARS.sub("_", str(name)).strip() or "_"
    return key[:_MAX_KEY]


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def param_text(value: Any) -> str:
    """A parameter value as text (lists, tuples and tensors element by element)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(param_text(v) for v in value) + "]"
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    return str(value)


def check_artifact_file(argument: str, artifact_file: Any, suffixes: tuple[str, ...]) -> str:
    """A run-relative artifact path with one of ``suffixes`` and no ``..``; errors name ``argument``."""
    if not isinstance(artifact_file, str) or not artifact_file.strip():
        raise TypeError(
            f"{argument} must be a run-relative file path such as 'ood/x{suffixes[0]}'; got {artifact_file!r}."
        )
    path = artifact_file.replace("\\", "/").lstrip("/")
    if ".." in path.split("/"):
        raise ValueError(f"{argument} must stay inside the run's artifacts (no '..'); got '{artifact_file}'.")
    if not path.lower().endswith(suffixes):
        raise ValueError(f"{argument} must end with {' or '.join(suffixes)}; got '{artifact_file}'.")
    return path


def rows_frame(rows: Any):
    """A table (list of row dicts, dict of columns or DataFrame) as a ``pandas.DataFrame``."""
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        frame = rows.copy()
    elif isinstance(rows, Mapping):
        frame = pd.DataFrame(dict(rows))
    elif isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)) and all(
        isinstance(r, Mapping) for r in rows
    ):
        frame = pd.DataFrame([{str(k): _plain(v) for k, v in r.items()} for r in rows])
    else:
        raise TypeError(
            "rows must be a list of dicts (one per table row), a dict of columns or a pandas DataFrame; "
            f"got {type(rows).__name__}."
        )
    # text columns as plain objects: MLflow's log_table selects them by the 'object' dtype (pandas 3 'str')
    return frame.astype({c: object for c in frame.columns if pd.api.types.is_string_dtype(frame[c])})


def _plain(value: Any) -> Any:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value

