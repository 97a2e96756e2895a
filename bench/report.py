"""Report benchmark: CPU ms per Structured Report, full highdicom build + write against the
shape's template filled + written (:mod:`dicom_node.sr_template`), in the same process, on the
NEMA RG1 radiograph with 14 findings (7 Present), a lateral and a cardiothoracic ratio.
Each study gets other probabilities, boxes and patient/study UIDs. Not a pass/fail test.

    .venv/bin/python bench/report.py [--studies 40]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from dicom_node.sr import CropInfo, build_report, write_report  # noqa: E402
from dicom_node.sr_template import ReportTemplates  # noqa: E402
from tests.dicom_node.test_sr import _ctr, _input  # noqa: E402


def studies(n: int) -> list:  # type: ignore[type-arg]
    base = pydicom.dcmread(REPO / "tests/data/RG1_UNCR.dcm", stop_before_pixels=True)
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        inp = _input(ds, ctr=_ctr())
        shift = 0.001 * i
        out.append(
            replace(
                inp,
                findings=[replace(f, probability=min(1.0, f.probability + shift))
                          for f in inp.findings],
                regions={"Pneumothorax": CropInfo(300 + i, 400, 700 + i, 900)},
            )
        )  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=40)
    args = ap.parse_args()
    inputs = studies(args.studies)
    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    templates = ReportTemplates()
    templates.render(inputs[0])  # the shape's first study: three highdicom builds
    t0 = time.process_time()
    for i, inp in enumerate(inputs):
        write_report(build_report(inp), tmp / f"full{i}.dcm")
    full = (time.process_time() - t0) * 1000 / len(inputs)
    t0 = time.process_time()
    for i, inp in enumerate(inputs):
        templates.render(inp).write(tmp / f"tpl{i}.dcm")
    tpl = (time.process_time() - t0) * 1000 / len(inputs)
    t0 = time.process_time()
    ReportTemplates().render(inputs[0])
    miss = (time.process_time() - t0) * 1000
    print(f"studies {len(inputs)}, CPU ms per report (build + write):")
    print(f"  full highdicom build    {full:8.1f}")
    print(
        f"  template fill           {tpl:8.1f}   ({templates.hits} hits, {templates.misses} miss)"
    )
    print(f"  a new shape's first     {miss:8.1f}   (own build + two probes + check)")
    print(f"ratio full/template: {full / tpl:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
