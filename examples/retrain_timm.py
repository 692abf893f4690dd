"""Retrain a timm backbone with a DisMax head, calibrate it, save it, load it and flag OOD inputs.

Runs offline on the embedded digits data (scikit-learn's bundled 8x8 digits, classes 0-5)::

    python examples/retrain_timm.py --epochs 8
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
from torch.utils.data import DataLoader

import dismax_plugin as dp
from dismax_plugin.adapters import timm as dtimm
from dismax_plugin.adapters.pytorch_ood import DigitsBenchmark


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each epoch after N steps (smoke runs)")
    parser.add_argument("--output", default=None, help="where to save the model (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # 1. A timm model whose classifier is a DisMax head (6 digit classes).
    model = dtimm.create_model(args.model, head="dismax", num_classes=6, pretrained=False)
    config = model.pretrained_cfg
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    bench = DigitsBenchmark(image_size=32, transform=None)  # tensors in [0, 1], 3 x 32 x 32

    def normalise(x):
        return (x - mean) / std

    # 2. Train with the DisMax loss and fractional probability regularisation (FPR). In training mode the head
    #    returns its logits times the entropic scale (10), so the loss scales nothing itself.
    loss_fn = dp.DisMaxLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(bench.train_set(), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model.train()
    for epoch in range(args.epochs):
        for step, (x, y) in enumerate(loader):
            if args.max_steps is not None and step >= args.max_steps:
                break
            inputs, targets, stitched = dp.fpr_mix(normalise(x), y, num_classes=6, generator=generator)
            loss = loss_fn(model(inputs), targets, stitched)  # stitched rows: the FPR KL term
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}")

    # 3. Calibrate the temperature, then store the calibration scores behind every OOD threshold, on held-out
    #    in-distribution data (the validation split: never used for training or testing).
    model.eval()
    head = dtimm.get_head(model)

    @torch.no_grad()
    def logits_of(dataset):
        out = [(model(normalise(x)), torch.as_tensor(y)) for x, y in DataLoader(dataset, batch_size=256)]
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    val_logits, val_labels = logits_of(bench.val_set())
    temperature = dp.calibrate_temperature(val_logits, val_labels, objective="ece")
    head.set_temperature(temperature)
    head.calibrate_scores(logits_of(bench.val_set())[0])  # what the calibrated model returns, scored at T = 1
    thresholds = {str(tpr): head.threshold(tpr) for tpr in (0.9, 0.95, 0.99)}  # any TPR in (0, 1] works
    print(f"temperature {temperature:.3f}; thresholds ({head.score}) {thresholds}")

    # 4. Save and load the model the timm way (config.json + model.safetensors), without the training code.
    with contextlib.ExitStack() as stack:
        output = args.output or stack.enter_context(tempfile.TemporaryDirectory(prefix="dismax-example-"))
        dtimm.save_model(model, output)
        loaded = dtimm.load_model(output)
    loaded_head = dtimm.get_head(loaded)

    # 5. Flag OOD inputs: in-distribution test digits vs digits 6-9 never seen in training.
    id_test = bench.test_sets(known=True, unknown=False)[0]
    near_ood = bench.test_sets(known=False, unknown=True)[0]
    with torch.no_grad():
        id_logits = torch.cat([loaded(normalise(x)) for x, _ in DataLoader(id_test, batch_size=256)])
        ood_logits = torch.cat([loaded(normalise(x)) for x, _ in DataLoader(near_ood, batch_size=256)])
    id_flagged = loaded_head.is_ood(id_logits, tpr=0.95).float().mean().item()
    ood_flagged = loaded_head.is_ood(ood_logits, tpr=0.95).float().mean().item()
    print(f"saved to {output}" if args.output else "saved to a temporary folder (removed); pass --output to keep it")
    print(f"flagged OOD at TPR 95%: ID test {id_flagged:.1%}, {bench.ood_names[0]} {ood_flagged:.1%}")
    return {"model": loaded, "id_flagged": id_flagged, "ood_flagged": ood_flagged, "temperature": temperature,
            "thresholds": thresholds, "calibration_size": head.calibration_size}  # fmt: skip


if __name__ == "__main__":
    main()
