"""Score every ensemble that candidate Model 2 networks can form, on the validation split only.

    nice -n 10 python -m models.training.select_members \\
        --member-of models/weights/model2.json --member var/m2bal1/model2.json \\
        --chexpert DATA/chexpert_small --chexpert DATA/chexpert_sample \\
        --nih DATA/nih_frontal/labels.csv --covid DATA/covid_chestxray \\
        --folder DATA/openist_normals/labels.csv:DATA/openist_normals:{id}.jpg \\
        --folder DATA/jsrt/labels.csv:DATA/jsrt:CXR_png/{id}.png \\
        --folder DATA/actualmed_partial/labels.csv:DATA/actualmed_partial \\
        --report var/select.json

The networks are an ensemble card's members (``--member-of``) and one-network cards
(``--member``), as :mod:`.finish` takes them (same network shape). Each network's raw logits on
the validation split (the studies and split of :mod:`.finish`: same sources, seed and fractions)
are computed once through the serving path (:func:`.finish.member_logits`: decode, lung mask,
crop, resize; no calibration); an ensemble's logits are the mean of its members' raw logits, as
the served ensemble computes them. Every non-empty subset is scored by

* the **within-source score** (the rule): for each of ``--within`` (default CheXpert and NIH,
  the sites of the independent sets), the mean of that source's 5-label competition AUROC and
  Model 1 AUROC, averaged over the sources; and
* the pooled score of :func:`.finish.selection_figures` (all validation studies together),

and listed best first. The test split is never read. Calibration (Platt, per label) is monotone,
so it does not change these AUROCs; :mod:`.finish` fits it for the chosen set afterwards.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.labels import OBSERVATIONS
from models.registry import ModelCard
from models.training.finish import (
    ARCH_KEYS,
    member_logits,
    members_of,
    read_members,
    same_shape,
    selection_figures,
)

log = logging.getLogger(__name__)

#: the sources of the independent sets (single-site each): the selection averages over them
WITHIN = ("chexpert", "nih")


def subset_scores(
    names: Sequence[str],
    logits: Sequence[np.ndarray],
    raw: np.ndarray,
    sources: Sequence[str],
    within: Sequence[str] = WITHIN,
) -> list[dict[str, Any]]:
    """Every non-empty subset of the networks (mean of raw logits), scored pooled and within
    each source of ``within``, best within-source score first."""
    labels = list(OBSERVATIONS)
    src = np.asarray(sources)
    missing = [s for s in within if not (src == s).any()]
    if missing:
        raise SystemExit(f"no validation studies of {', '.join(missing)}")
    rows = []
    for k in range(1, len(names) + 1):
        for combo in itertools.combinations(range(len(names)), k):
            z = np.mean([logits[i] for i in combo], axis=0)
            per = {s: selection_figures(labels, raw[src == s], z[src == s]) for s in within}
            rows.append(
                {
                    "members": [names[i] for i in combo],
                    "within_source_score": round(
                        float(np.mean([per[s]["score"] for s in within])), 4
                    ),
                    "pooled": selection_figures(labels, raw, z),
                    "per_source": per,
                }
            )
    return sorted(rows, key=lambda r: -r["within_source_score"])


def figures(f: dict[str, Any]) -> str:
    """``5-label/Model 1`` AUROCs of one row's source, for the printed table."""
    return f"{f['competition5_mean_auroc']:.3f}/{f['model1_auroc']:.3f}"


def run(args: argparse.Namespace) -> int:
    from models.training.datasets.sources import patient_split3, studies_from_args
    from models.training.studies import labelled

    members = [
        *(m for card in args.member_of or [] for m in members_of(card)),
        *(read_members(args.member, Path("select")) if args.member else []),
    ]
    if not members:
        raise SystemExit("give networks to compare: --member-of ENSEMBLE_CARD, --member CARD")
    first = members[0][1]
    for src, card, _ in members[1:]:
        same_shape(card, first, f"network {src}", f"network {members[0][0]}")
    names = [
        f"{card.name} {card.version} ({src.name}, sha256 {card.sha256[:12]})"
        for src, card, _ in members
    ]
    everything = studies_from_args(args)
    parts = patient_split3(everything, args.val_fraction, args.test_fraction, args.seed)
    val = labelled(parts["val"], "model2")
    base = ModelCard(
        name="model2",
        version="selection",
        architecture=first.architecture,
        weights_file="unused.safetensors",
        sha256="0" * 64,
        input_size=first.input_size,
        normalisation=first.normalisation,
        labels=list(OBSERVATIONS),
        hyperparameters={
            **{k: first.hyperparameters[k] for k in ARCH_KEYS},
            "input_crop": first.hyperparameters.get("input_crop"),
        },
    )
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        logits = member_logits(members, base, val, args, Path(tmp))
    log.info(
        "served logits of %d networks on %d validation studies in %.0f s",
        len(members),
        len(val),
        time.time() - t,
    )
    raw = np.stack([r.raw for r in val])
    ok = ~np.isnan(np.stack(logits)).any(axis=(0, 2))
    within = args.within.split(",")
    sources = [r.source for r, k in zip(val, ok, strict=True) if k]
    rows = subset_scores(names, [z[ok] for z in logits], raw[ok], sources, within)
    sha = {n: card.sha256 for n, (_, card, _) in zip(names, members, strict=True)}
    for r in rows:
        r["sha256"] = [sha[n] for n in r["members"]]
    print(f"{'within':>7} {'pooled':>7}  " + "  ".join(f"{s:>14}" for s in within) + "  networks")
    for r in rows:
        per = "  ".join(figures(r["per_source"][s]).rjust(14) for s in within)
        pooled = r["pooled"]["score"]
        print(f"{r['within_source_score']:7.3f} {pooled:7.3f}  {per}  {' + '.join(r['members'])}")
    if args.report:
        rule = (
            "validation split only (served path, mean of raw logits); within-source score = "
            f"mean over {', '.join(within)} of (5-label mean AUROC + Model 1 AUROC) / 2"
        )
        report = {
            "rule": rule,
            "validation_studies": int(ok.sum()),
            "failed": int((~ok).sum()),
            "ranking": rows,
        }
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from models.training.pack import parse_with_sources

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--member-of", type=Path, action="append", help="an ensemble card")
    extra.add_argument("--member", type=Path, action="append", help="a one-network card")
    extra.add_argument("--within", default=",".join(WITHIN), help="sources of the rule")
    extra.add_argument("--report", type=Path, help="write the ranking as JSON")
    return parse_with_sources(extra, argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
