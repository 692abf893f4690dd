"""The logged models: the ``pytorch`` flavour (``pt2`` via ``torch.export``, pickle only where export fails)
and the served pyfunc model (models-from-code, ``_served_model.py``; its signature declares the serve-time
params ``tpr`` and ``score``). Neither needs pickle to load. The pyfunc model is registered under the
connection's ``register_model`` name, with its registry ``aliases`` pointed at the new version.

Both carry the ``dismax_plugin`` package in ``code_paths`` (:func:`stage_code_package`) and pinned
:func:`pip_requirements`. The run tag ``dismax.pytorch_model.serialization`` says which format the
``pytorch`` flavour got (``pt2`` or ``pickle``), and ``dismax.pytorch_model.export_error`` why when it is
``pickle``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ._images import check_preprocessing, model_examples
from ._uri import fluent_tracking_uri, is_connectivity_error, server_error_status

__all__ = ["PYFUNC_MODEL_NAME", "PYTORCH_MODEL_NAME", "SERVED_MODEL_CODE", "log_model", "pip_requirements",
           "stage_code_package"]  # fmt: skip

PYFUNC_MODEL_NAME = "model"
PYTORCH_MODEL_NAME = "pytorch_model"
#: The models-from-code file of the served model.
SERVED_MODEL_CODE = str(Path(__file__).with_name("_served_model.py"))
SERIALIZATION_TAG = "dismax.pytorch_model.serialization"

log = logging.getLogger("dismax_plugin.adapters.mlflow")


def stage_code_package(destination: str) -> str:
    """Copy the ``dismax_plugin`` package, with ``adapters`` as its sub-package, into ``destination``.

    In a source checkout ``dismax_plugin.adapters`` lives in a separate folder; MLflow's ``code_paths``
    needs one importable tree, so this builds it. Returns the path of the staged ``dismax_plugin`` folder.
    """
    import dismax_plugin
    import dismax_plugin.adapters as adapters

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    core = Path(dismax_plugin.__file__).resolve().parent
    target = Path(destination) / "dismax_plugin"
    shutil.copytree(core, target, ignore=ignore, dirs_exist_ok=True)
    adapters_dir = Path(adapters.__file__).resolve().parent
    if adapters_dir != core / "adapters":
        shutil.copytree(adapters_dir, target / "adapters", ignore=ignore, dirs_exist_ok=True)
    return str(target)


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged models (the installed versions of what they import)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            out.append(dist)
    return out


class _KnownNotices(logging.Filter):
    """Drops MLflow's notice about a pickled model: the fallback is deliberate, tagged and warned about."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Saving pytorch model by Pickle")


@contextlib.contextmanager
def _quiet_pickle_notice() -> Iterator[None]:
    logger, notice = logging.getLogger("mlflow.pytorch"), _KnownNotices()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def log_model(target, run_id: str, payload: dict, conn) -> str:
    """Log one flavour (``payload["flavor"]``: ``pytorch`` or ``pyfunc``) of the model in ``target``.

    :param target: the store (:class:`~dismax_plugin.adapters.mlflow._store.Target`).
    :param payload: ``model_dir`` (written by ``dtimm.save_model``), ``input_example``, ``flavor`` and,
        for ``pytorch``, the CPU ``model``.
    :param conn: the connection (``register_model`` and its ``aliases``; ``logged_models`` is filled for the
        primary store).
    :return: the logged model's id.
    """
    from mlflow.entities import LoggedModelOutput

    from dismax_plugin.adapters.timm import read_metadata

    name = PYTORCH_MODEL_NAME if payload["flavor"] == "pytorch" else PYFUNC_MODEL_NAME
    experiment_id = target.client.get_run(run_id).info.experiment_id
    metadata = read_metadata(payload["model_dir"]).get("metadata") or {}
    raw, model_input = model_examples(payload["input_example"], check_preprocessing(metadata.get("preprocessing")))
    with tempfile.TemporaryDirectory(prefix="dismax-mlflow-code-") as staging, fluent_tracking_uri(target.uri):
        common = {"code_paths": [stage_code_package(staging)], "pip_requirements": pip_requirements()}
        logged = target.client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
        common.update(name=name, model_id=logged.model_id)
        if payload["flavor"] == "pytorch":
            result = _log_pytorch(target, run_id, payload["model"], model_input, common)
        else:
            registry = (conn.register_model, tuple(conn.aliases))
            result = _log_pyfunc(target, run_id, payload["model_dir"], raw, registry, common)
        target.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    if target is conn.primary:
        conn.logged_models[name] = dict(result, model_id=logged.model_id)
    return logged.model_id


def _log_pytorch(target, run_id: str, model, model_input, common: dict) -> dict:
    """``pt2`` (``torch.export``, batch dimension dynamic); pickle when the architecture does not export."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.inference_mode():
        signature = infer_signature(model_input, model(torch.from_numpy(model_input)).float().numpy())
    try:
        info = mlflow.pytorch.log_model(
            model, serialization_format="pt2", signature=signature, input_example=model_input, **common
        )
        target.client.set_tag(run_id, SERIALIZATION_TAG, "pt2")
    except Exception as error:
        if is_connectivity_error(error) or server_error_status(error) is not None:
            raise  # the server went away or failed: the connection keeps the call, nothing to fall back from
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        log.warning("torch.export failed for this model (%s); logging the pytorch flavour pickled", reason[:300])
        with _quiet_pickle_notice():
            info = mlflow.pytorch.log_model(
                model, serialization_format="pickle", signature=signature, input_example=model_input, **common
            )
        target.client.set_tag(run_id, SERIALIZATION_TAG, "pickle")
        target.client.set_tag(run_id, "dismax.pytorch_model.export_error", reason[:5000])
    return {"model_uri": info.model_uri}


def _log_pyfunc(target, run_id: str, model_dir: str, raw, registry: tuple[str | None, tuple[str, ...]],
                common: dict) -> dict:  # fmt: skip
    """The served model, from code: ``_served_model.py`` + the saved model folder as an artifact; registered
    as ``registry[0]`` (when given) with the aliases ``registry[1]`` on the new version."""
    register_model, aliases = registry
    import mlflow.pyfunc

    from dismax_plugin.adapters.timm import read_metadata

    from ._pyfunc import model_signature

    info = mlflow.pyfunc.log_model(
        python_model=SERVED_MODEL_CODE,
        artifacts={"model_dir": str(model_dir)},
        signature=model_signature(read_metadata(model_dir)),
        input_example=raw,
        registered_model_name=register_model,
        **common,
    )
    target.client.set_tag(run_id, "dismax.pyfunc_model_uri", info.model_uri)
    version = getattr(info, "registered_model_version", None)
    if register_model and version is not None:
        for alias in aliases:  # MLflow moves an alias that named an older version onto this one
            target.client.set_registered_model_alias(register_model, alias, str(version))
            log.info("Set alias '%s' of model '%s' to version %s (models:/%s@%s).", alias, register_model, version,
                     register_model, alias)  # fmt: skip
    return {"model_uri": info.model_uri, "registered_model_version": version, "aliases": list(aliases)}
