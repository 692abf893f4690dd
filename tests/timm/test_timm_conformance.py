"""timm conformance: the registered ``<arch>_<head>`` models pass timm's generic model checks where the stock
architecture does (the checks of timm's tests/test_models.py, rewritten here at small input sizes).

Each check runs on the stock model too: with the stock backbone weights copied into the isotropic variant,
features, pre-logits, intermediates and the feature model (``num_classes=0`` / ``reset_classifier(0)``) must
equal the stock model's; the logits have the stock shapes. Departure from timm's suite, by design: the
classifier path holds ``<path>.weight`` (the head's prototypes, named as ``nn.Linear.weight``, as timm's
``test_model_default_cfgs`` asserts).
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

from dismax_plugin import HEADS, PrototypeHead
from dismax_plugin.adapters import timm as dtimm

KINDS = ("dismax", "isomaxplus", "isomax")

# (architecture, timm kwargs, input side): tiny test_* models and small real ones, 23 families
ARCHS = [
    ("test_resnet", {}, 64),
    ("test_convnext", {}, 64),
    ("test_efficientnet", {}, 64),
    ("test_byobnet", {}, 64),
    ("test_nfnet", {}, 64),
    ("test_mambaout", {}, 64),
    ("test_vit", {"img_size": 64}, 64),
    ("test_vit_relpos", {"img_size": 64}, 64),
    ("test_coatnet", {"img_size": 64}, 64),
    ("test_maxvit", {"img_size": 64}, 64),
    ("resnet10t", {}, 64),
    ("regnetx_002", {}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("lcnet_050", {}, 64),
    ("ghostnet_050", {}, 64),
    ("resnetv2_18", {}, 64),  # 1x1-conv classifier
    ("dla46_c", {}, 64),  # 1x1-conv classifier
    ("hgnetv2_b0", {}, 64),
    ("repvit_m0_9", {}, 64),  # head + distillation head
    ("edgenext_xx_small", {}, 64),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64),  # head + head_dist
    ("mobilevit_xxs", {}, 64),
    ("efficientvit_m0", {"img_size": 64}, 64),
]
CASES = [(a, kw, s, KINDS[i % len(KINDS)]) for i, (a, kw, s) in enumerate(ARCHS)]
IDS = [a for a, _, _ in ARCHS]
SCRIPT_ARCHS = {
    "test_resnet",
    "test_convnext",
    "test_efficientnet",
    "test_vit",
    "resnet10t",
    "resnetv2_18",
    "dla46_c",
    "deit_tiny_distilled_patch16_224",
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def registered():
    dtimm.register_timm_models([a for a, _, _ in ARCHS])


def _pair(arch, kind, kwargs, **extra):
    """The stock model and its registered variant, in eval mode, with the stock backbone weights in both."""
    torch.manual_seed(0)
    stock = timm.create_model(arch, **kwargs, **extra).eval()
    model = timm.create_model(dtimm.registered_name(arch, kind), **kwargs, **extra).eval()
    prefixes = tuple(p + "." for p in dtimm.classifier_paths(stock))
    backbone = {k: v for k, v in stock.state_dict().items() if not k.startswith(prefixes)}
    result = model.load_state_dict(backbone, strict=False)
    assert not result.unexpected_keys and all(k.startswith(prefixes) for k in result.missing_keys)
    return stock, model


def _cat(output):
    return torch.cat(output) if isinstance(output, tuple) else output


def _heads(model):
    found = []
    for path in dtimm.classifier_paths(model):
        try:
            found.append(model.get_submodule(path))
        except AttributeError:
            pass
    return found


def _succeeds(fn):
    """``(True, value)`` if ``fn()`` runs, else ``(False, None)``: a check the stock model fails is skipped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return True, fn()
    except Exception:  # any failure of the stock model: timm's suite does not apply there
        return False, None


@pytest.mark.parametrize(("arch", "kwargs", "size", "kind"), CASES, ids=IDS)
def test_forward_features_and_feature_model(arch, kwargs, size, kind):
    """timm's test_model_forward + test_model_default_cfgs(_non_std) + forward_intermediates."""
    stock, model = _pair(arch, kind, kwargs)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = _cat(model(x))
        assert logits.shape == _cat(stock(x)).shape and logits.shape[-1] == 1000 and torch.isfinite(logits).all()
        assert all(isinstance(h, PrototypeHead) and h.kind == kind for h in _heads(model))
        state = model.state_dict()
        assert all(
            f"{p}.weight" in state for p in dtimm.classifier_paths(model) if p + ".weight" in stock.state_dict()
        )
        first = model.pretrained_cfg["first_conv"]
        assert all(f"{c}.weight" in state for c in ((first,) if isinstance(first, str) else first))
        assert model.num_features > 0 and model.head_hidden_size > 0

        features = model.forward_features(x)
        assert torch.equal(_cat(features), _cat(stock.forward_features(x)))
        pre = model.forward_head(features, pre_logits=True)
        assert torch.equal(pre, stock.forward_head(stock.forward_features(x), pre_logits=True))
        if not isinstance(features, (tuple, list)):
            assert pre.shape[1] == model.head_hidden_size

        ok, expected = _succeeds(lambda: stock.forward_intermediates(x))
        if ok:
            final, intermediates = model.forward_intermediates(x)
            assert torch.equal(final, expected[0]) and len(intermediates) == len(expected[1])
            assert all(torch.equal(a, b) for a, b in zip(intermediates, expected[1]))

        ok, checkpointed = _succeeds(lambda: (stock.set_grad_checkpointing(), stock(x))[1])
        if ok:
            model.set_grad_checkpointing()
            assert torch.allclose(_cat(model(x)), logits, rtol=1e-4, atol=1e-5)

        stock.reset_classifier(0)
        model.reset_classifier(0)
        assert model.num_classes == 0 and dtimm.get_head(model) is None and dtimm.head_kind(model) == kind
        pooled = _cat(model(x))
        assert torch.equal(pooled, _cat(stock(x))) and pooled.ndim == 2

        model.reset_classifier(5)
        assert model.num_classes == 5 and _cat(model(x)).shape[-1] == 5
        assert all(isinstance(h, PrototypeHead) and h.kind == kind and h.num_classes == 5 for h in _heads(model))

        ok, unpooled = _succeeds(lambda: (stock.reset_classifier(0, ""), _cat(stock(x)))[1])
        if ok:
            model.reset_classifier(0, "")
            assert torch.equal(_cat(model(x)), unpooled)


@pytest.mark.parametrize(("arch", "kwargs", "size", "kind"), CASES, ids=IDS)
def test_created_feature_model_and_features_only(arch, kwargs, size, kind):
    """``create_model(..., num_classes=0, global_pool='')`` and ``features_only=True`` as for the stock model."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    name = dtimm.registered_name(arch, kind)
    with torch.no_grad():
        ok, expected = _succeeds(
            lambda: _cat(timm.create_model(arch, num_classes=0, global_pool="", **kwargs).eval()(x))
        )
        if ok:
            model = timm.create_model(name, num_classes=0, global_pool="", **kwargs).eval()
            assert model.num_classes == 0 and dtimm.head_kind(model) == kind
            assert _cat(model(x)).shape == expected.shape
        ok, expected = _succeeds(lambda: timm.create_model(arch, features_only=True, **kwargs).eval()(x))
        if ok:
            extractor = timm.create_model(name, features_only=True, **kwargs).eval()
            outputs = extractor(x)
            assert [o.shape for o in outputs] == [e.shape for e in expected]
            assert len(extractor.feature_info.channels()) == len(outputs)


@pytest.mark.parametrize(("arch", "kwargs", "size", "kind"), CASES, ids=IDS)
def test_backward(arch, kwargs, size, kind):
    """timm's test_model_backward: 42 classes, train mode, every parameter gets a gradient."""
    torch.manual_seed(0)
    model = timm.create_model(dtimm.registered_name(arch, kind), num_classes=42, **kwargs).train()
    outputs = _cat(model(torch.randn(2, 3, size, size)))
    outputs.mean().backward()
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize(("arch", "kwargs", "size", "kind"), CASES, ids=IDS)
def test_fx_feature_extraction(arch, kwargs, size, kind):
    """timm's test_model_forward_fx: symbolic tracing with timm's leaf modules gives the eager output (the
    stock models of this list pass it as well)."""
    torch.manual_seed(0)
    model = timm.create_model(dtimm.registered_name(arch, kind), **kwargs).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, eval_nodes = timm.layers.get_graph_node_names(model)
        graph = timm.layers.create_feature_extractor(model, [eval_nodes[-1]])
        assert torch.equal(_cat(tuple(graph(x).values())), _cat(model(x)))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    ("arch", "kwargs", "size", "kind"),
    [c for c in CASES if c[0] in SCRIPT_ARCHS],
    ids=sorted(SCRIPT_ARCHS, key=IDS.index),
)
def test_torchscript(arch, kwargs, size, kind):
    """timm's test_model_forward_torchscript."""
    with timm.set_scriptable(True):
        model = timm.create_model(dtimm.registered_name(arch, kind), **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    "cls", [*HEADS.values(), dtimm.Conv2dDisMaxHead, dtimm.Conv2dIsoMaxPlusHead, dtimm.Conv2dIsoMaxHead]
)
def test_heads_trace_script_and_export(cls):
    """The heads alone: torch.fx.symbolic_trace, torch.jit.script and torch.export give the eager logits."""
    head = cls(8, 3).eval()
    head.set_temperature(0.5)
    features = torch.randn(4, 8, 2, 2) if cls.__name__.startswith("Conv2d") else torch.randn(4, 8)
    expected = head(features)
    traced = torch.fx.symbolic_trace(head, concrete_args={"pre_logits": False})
    assert torch.equal(traced(features), expected)
    assert torch.allclose(torch.jit.script(head)(features), expected, atol=1e-6)
    assert torch.allclose(torch.export.export(head, (features,)).module()(features), expected, atol=1e-6)
    with pytest.raises(ValueError, match="features must have shape"):
        head(torch.randn(4, 7))


def test_conformance_spread():
    assert len({a for a, _, _ in ARCHS}) == len(ARCHS) >= 20
    assert len({timm.models.model_entrypoint(a).__module__ for a, _, _ in ARCHS}) >= 20
