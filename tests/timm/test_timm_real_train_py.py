"""timm's real ``train.py`` (from the timm repository, not in the wheel) trains a registered isotropic variant
through ``--device-modules dismax_plugin.adapters.timm.register``, and ``dismax import`` turns its checkpoint
into a calibrated model folder with the isotropic head.

Where train.py comes from: ``$DISMAX_TIMM_REPO`` (a folder holding ``train.py``, e.g. a pytorch-image-models
checkout), else the git mirror ``/work/.mirror/huggingface+pytorch-image-models`` (``git archive`` of the tag of
the installed timm, ``v<version>``, or the mirror's newest commit when that tag is absent) into ``tmp_path``;
otherwise the test is skipped. It runs as ``python -P train.py`` so the installed timm is imported, not a
``timm/`` folder next to the script. Nothing of timm's repository is kept in this project.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dismax_plugin as dp
from dismax_plugin.adapters import timm as dtimm
from dismax_plugin.adapters.engine.cli import main

MIRROR = Path("/work/.mirror/huggingface+pytorch-image-models")
CLASSES, SIDE = 3, 16


def _git(git_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, timeout=120)


def _mirror_train_py(into: Path) -> tuple[Path, str] | None:
    """train.py of the installed timm's tag (else the newest commit) from the mirror, and which one it is."""
    git_dir = next((d for d in (MIRROR / "repo", MIRROR) if (d / "HEAD").is_file()), None)
    if git_dir is None:
        return None
    tag = f"v{timm.__version__}"
    ref = tag if _git(git_dir, "rev-parse", "--verify", "-q", f"{tag}^{{commit}}").returncode == 0 else "HEAD"
    archive = _git(git_dir, "archive", "--format=tar", ref, "train.py")
    if archive.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into, ref


@pytest.fixture(scope="module")
def train_py(tmp_path_factory) -> Path:
    """The folder holding timm's train.py (see the module docstring), or a skip saying why there is none."""
    given = os.environ.get("DISMAX_TIMM_REPO")
    if given:
        if not (Path(given) / "train.py").is_file():
            pytest.fail(f"DISMAX_TIMM_REPO={given!r} holds no train.py")
        return Path(given)
    found = _mirror_train_py(tmp_path_factory.mktemp("timm_repo"))
    if found is None:
        pytest.skip(f"timm's train.py is not available: set DISMAX_TIMM_REPO to a pytorch-image-models checkout "
                    f"(no git mirror at {MIRROR})")  # fmt: skip
    return found[0]


def _folder(root: Path) -> Path:
    """3 classes of flat grey levels (noisy) in train/, val/ and test/; a near and a far OOD set."""
    rng = np.random.default_rng(0)

    def images(folder: Path, count: int, value: int | None) -> None:
        folder.mkdir(parents=True)
        for i in range(count):
            base = rng.integers(0, 256, (SIDE, SIDE, 3)) if value is None else np.full((SIDE, SIDE, 3), value)
            pixels = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")

    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        for c in range(CLASSES):
            images(root / split / str(c), count, 40 + 80 * c)
    images(root / "ood" / "near" / "grey", 4, 100)
    images(root / "ood" / "far" / "noise", 4, None)
    return root


@pytest.mark.slow
def test_real_train_py_checkpoint_imports_as_a_calibrated_isotropic_model(train_py, tmp_path, capsys):
    data, out = _folder(tmp_path / "data"), tmp_path / "train_py"
    command = [sys.executable, "-P", str(train_py / "train.py"), "--data-dir", str(data), "--train-split", "train",
               "--val-split", "val", "--model", "test_resnet_dismax", "--num-classes", str(CLASSES),
               "--device-modules", "dismax_plugin.adapters.timm.register", "--model-kwargs", "entropic_scale=5",
               "--device", "cpu", "--no-prefetcher", "--workers", "0", "--img-size", str(SIDE), "--crop-pct", "1.0",
               "--batch-size", "8", "--validation-batch-size", "12", "--epochs", "1", "--warmup-epochs", "0",
               "--lr", "0.05", "--hflip", "0", "--output", str(out), "--experiment", "run"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run = out / "run"
    assert {"last.pth.tar", "model_best.pth.tar", "args.yaml"} <= {p.name for p in run.iterdir()}

    # timm itself loads train.py's checkpoint of the registered variant (registered here as the register module
    # registered it in train.py's process)
    dtimm.register_timm_models(["test_resnet"])
    again = timm.create_model("test_resnet_dismax", num_classes=CLASSES, entropic_scale=5.0,
                              checkpoint_path=str(run / "last.pth.tar"))  # fmt: skip
    assert isinstance(again.fc, dp.DisMaxHead) and again.fc.entropic_scale == 5.0

    imported = tmp_path / "imported"
    try:
        code = main(["import", "--checkpoint", str(run), "--data", str(data), "--output", str(imported),
                     "--device", "cpu"])  # fmt: skip
    except SystemExit as stop:
        code = stop.code
    assert code == 0, capsys.readouterr().err
    model = dtimm.load_model(imported / "model")
    assert type(model.fc) is dp.DisMaxHead and model.fc.entropic_scale == 5.0
    # calibrated on val/ (train.py's validation folder, disjoint from train/ and test/)
    assert model.fc.calibration_size == CLASSES * 4 and float(model.fc.temperature) > 0
    trained = timm.models.load_state_dict(str(run / "model_best.pth.tar"), use_ema=False)
    assert torch.equal(model.fc.weight, trained["fc.weight"])
    meta = model.dismax_metadata["metadata"]
    assert meta["preprocessing"]["input_size"] == [3, SIDE, SIDE] and meta["preprocessing"]["crop_pct"] == 1.0
    assert meta["imported_from"]["train_py_args"]["model_kwargs"] == {"entropic_scale": 5}
