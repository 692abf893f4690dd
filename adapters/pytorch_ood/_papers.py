"""Publication records (pytorch-ood ``Paper``) of IsoMax, IsoMax+ and DisMax, and their author lists.

* IsoMax: *Entropic Out-of-Distribution Detection*, D. Macêdo, T. I. Ren, C. Zanchettin,
  A. L. I. Oliveira, T. Ludermir, arXiv 1908.05569 (2019), IJCNN 2021.
* IsoMax+: *Enhanced Isotropy Maximization Loss: Seamless and High-Performance Out-of-Distribution
  Detection Simply Replacing the SoftMax Loss*, D. Macêdo, T. Ludermir, arXiv 2105.14399 (2021).
* DisMax: *Distinction Maximization Loss: Efficiently Improving Out-of-Distribution Detection and
  Uncertainty Estimation by Replacing the Loss and Calibrating*, D. Macêdo, C. Zanchettin,
  T. Ludermir, arXiv 2205.05874 (2022).
"""

from __future__ import annotations

from pytorch_ood.api import Paper

__all__ = ["DISMAX_PAPER", "ISOMAX_PAPER", "ISOMAX_PLUS_PAPER", "PAPER_AUTHORS"]

_ISOMAX_CODE = "https://github.com/dlmacedo/entropic-out-of-distribution-detection"

#: IsoMax loss and entropic score (arXiv 1908.05569, first version 2019; published at IJCNN 2021).
ISOMAX_PAPER = Paper(
    title="Entropic Out-of-Distribution Detection",
    venue="IJCNN",
    year=2021,
    url="https://arxiv.org/abs/1908.05569",
    code=_ISOMAX_CODE,
)

#: IsoMax+ loss and minimum distance score (arXiv 2105.14399, 2021).
ISOMAX_PLUS_PAPER = Paper(
    title=(
        "Enhanced Isotropy Maximization Loss: Seamless and High-Performance Out-of-Distribution "
        "Detection Simply Replacing the SoftMax Loss"
    ),
    venue="arXiv",
    year=2021,
    url="https://arxiv.org/abs/2105.14399",
    code=_ISOMAX_CODE,
)

#: DisMax loss, fractional probability regularisation and the MMLES score (arXiv 2205.05874, 2022).
DISMAX_PAPER = Paper(
    title=(
        "Distinction Maximization Loss: Efficiently Improving Out-of-Distribution Detection and "
        "Uncertainty Estimation by Replacing the Loss and Calibrating"
    ),
    venue="arXiv",
    year=2022,
    url="https://arxiv.org/abs/2205.05874",
    code="https://github.com/dlmacedo/distinction-maximization-loss",
)

#: Author lists by arXiv URL (``pytorch_ood.api.Paper`` has no author field).
PAPER_AUTHORS: dict[str, tuple[str, ...]] = {
    ISOMAX_PAPER.url: (
        "David Macêdo",
        "Tsang Ing Ren",
        "Cleber Zanchettin",
        "Adriano L. I. Oliveira",
        "Teresa Ludermir",
    ),
    ISOMAX_PLUS_PAPER.url: ("David Macêdo", "Teresa Ludermir"),
    DISMAX_PAPER.url: ("David Macêdo", "Cleber Zanchettin", "Teresa Ludermir"),
}
