"""Label lists shared by inference and training.

The observation names are CheXpert's column names: they describe the *data format* (what a
training source labels and how a torchxrayvision checkpoint's outputs are mapped). The labels a
trained model predicts are stored in, and read from, its model card.
"""

from __future__ import annotations

#: The 14 CheXpert observations, in the order of the CheXpert paper / competition.
OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
#: The 5 observations of the CheXpert competition (mean AUROC is reported over these).
COMPETITION: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)
#: Observations that make a study "abnormal" for Model 1 (support devices alone do not).
PATHOLOGIES: tuple[str, ...] = tuple(
    o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices")
)
#: Model 1's single label: the probability that a study is not "No Finding".
MODEL1_LABELS: tuple[str, ...] = ("Abnormal",)

#: Uncertainty policies: how a CheXpert "uncertain" (-1) label becomes a training target
#: (:func:`models.training.datasets.chexpert.apply_policy`).
POLICIES: tuple[str, ...] = ("u-ignore", "u-zeros", "u-ones", "lsr-ones", "lsr-zeros")
