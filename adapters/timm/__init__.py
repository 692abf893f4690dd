r"""timm adapter: timm models whose final classifier is an IsoMax, IsoMax+ or DisMax head.

.. code-block:: python

    from dismax_plugin.adapters import timm as dtimm

    model = dtimm.create_model("convnext_atto", head="dismax", num_classes=10)   # pretrained=True: timm's hub
    model = dtimm.convert_timm_model(timm_model, head="isomaxplus")
    dtimm.save_model(model, "runs/m", metadata={"preprocessing": {...}, "class_names": [...]})
    model = dtimm.load_model("runs/m", device="cpu")
    dtimm.register_timm_models()      # only if you want timm.create_model("resnet18_dismax") / "local-dir:..."

Modules: ``_names`` (head kinds, variant names, the architecture check), ``_conv_heads`` (heads for 1x1-conv
classifiers), ``_convert`` (the swap and the converted model class), ``_weights`` (:func:`create_model`,
pretrained and checkpoint weights), ``_registry`` (explicit timm registration), ``_io`` (the saved timm
model directory) and the public :mod:`~dismax_plugin.adapters.timm.preprocessing`. Importing this package
changes nothing in timm (``timm.list_models()`` stays as it is); importing
:mod:`dismax_plugin.adapters.timm.register` (timm ``train.py``'s ``--device-modules``) registers every variant.
"""

from __future__ import annotations

from ._conv_heads import Conv2dDisMaxHead, Conv2dIsoMaxHead, Conv2dIsoMaxPlusHead
from ._convert import classifier_paths, convert_timm_model, get_head, head_kind, head_options
from ._io import CONFIG_NAME, FORMAT, WEIGHTS_NAME, load_model, read_metadata, save_model
from ._names import HEAD_KINDS, HEAD_OPTIONS, check_architecture, registered_name, split_registered_name
from ._registry import register_timm_models
from ._weights import create_model

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "HEAD_KINDS",
    "HEAD_OPTIONS",
    "WEIGHTS_NAME",
    "Conv2dDisMaxHead",
    "Conv2dIsoMaxHead",
    "Conv2dIsoMaxPlusHead",
    "check_architecture",
    "classifier_paths",
    "convert_timm_model",
    "create_model",
    "get_head",
    "head_kind",
    "head_options",
    "load_model",
    "read_metadata",
    "register_timm_models",
    "registered_name",
    "save_model",
    "split_registered_name",
]
