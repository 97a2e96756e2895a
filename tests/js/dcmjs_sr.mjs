// Read a Structured Report the way OHIF's SR tooling does: dcmjs parses and naturalizes the file,
// then the Cornerstone3D MeasurementReport adapter (@cornerstonejs/adapters, the version OHIF
// 3.13.2 ships) turns its TID 1500 measurement groups into tool state.
//
//   node dcmjs_sr.mjs REPORT.dcm
//
// Prints one JSON line: the SOP class, the TID, the number of measurement groups, the tool state
// the adapter made (tool type -> count, with each measurement's description and points), and the
// warnings it raised. Exits 1 (after printing) when anything throws.
import fs from 'node:fs';

import dcmjs from 'dcmjs';
import * as core from '@cornerstonejs/core';
import { adaptersSR } from '@cornerstonejs/adapters';

const { MeasurementReport } = adaptersSR.Cornerstone3D;
const out = { ok: false, warnings: [] };

function asArray(x) {
  if (x === undefined || x === null) return [];
  return Array.isArray(x) ? x : [x];
}

function meaning(item) {
  const seq = asArray(item.ConceptNameCodeSequence)[0];
  return seq ? seq.CodeMeaning : undefined;
}

try {
  const path = process.argv[2];
  if (!path) throw new Error('usage: node dcmjs_sr.mjs REPORT.dcm');
  const bytes = fs.readFileSync(path);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const dicom = dcmjs.data.DicomMessage.readFile(buffer);
  const dataset = dcmjs.data.DicomMetaDictionary.naturalizeDataset(dicom.dict);
  dataset._meta = dcmjs.data.DicomMetaDictionary.namifyDataset(dicom.meta);
  out.sopClassUID = dataset.SOPClassUID;
  out.template = asArray(dataset.ContentTemplateSequence)[0]?.TemplateIdentifier;

  // every image the report names becomes an image id with a plain image plane (1 px = 1 mm,
  // origin 0): the adapter turns SCOORD pixel coordinates into world points through it
  const evidence = asArray(dataset.CurrentRequestedProcedureEvidenceSequence)
    .flatMap((study) => asArray(study.ReferencedSeriesSequence))
    .flatMap((series) => asArray(series.ReferencedSOPSequence));
  const imageIds = {};
  for (const ref of evidence) {
    imageIds[`${ref.ReferencedSOPInstanceUID}:1`] = `srcheck:${ref.ReferencedSOPInstanceUID}`;
  }
  core.metaData.addProvider((type, imageId) => {
    if (typeof imageId !== 'string' || !imageId.startsWith('srcheck:')) return undefined;
    if (type === 'imagePlaneModule') {
      return {
        frameOfReferenceUID: '1.2.826.0.1.3680043.8.498.1',
        rowCosines: [1, 0, 0],
        columnCosines: [0, 1, 0],
        imagePositionPatient: [0, 0, 0],
        rowPixelSpacing: 1,
        columnPixelSpacing: 1,
        pixelSpacing: [1, 1],
        rows: 4096,
        columns: 4096,
      };
    }
    return undefined;
  }, 10000);

  const report = asArray(dataset.ContentSequence).find(
    (item) => meaning(item) === 'Imaging Measurements',
  );
  out.measurementGroups = asArray(report?.ContentSequence).filter(
    (item) => meaning(item) === 'Measurement Group',
  ).length;

  const log = console.log;
  const warn = console.warn;
  console.log = () => {};
  console.warn = (...args) => {
    out.warnings.push(args.map((a) => (a instanceof Error ? a.message : String(a))).join(' '));
  };
  let toolState;
  try {
    toolState = MeasurementReport.generateToolState(dataset, imageIds, core.metaData, {});
  } finally {
    console.log = log;
    console.warn = warn;
  }
  out.toolState = {};
  out.measurements = [];
  for (const [toolType, items] of Object.entries(toolState)) {
    out.toolState[toolType] = items.length;
    for (const m of items) {
      out.measurements.push({
        toolType,
        description: m.description ?? null,
        finding: m.finding?.CodeMeaning ?? null,
        sopInstanceUid: m.sopInstanceUid ?? null,
        points: (m.annotation?.data?.handles?.points ?? []).map((p) => Array.from(p)),
      });
    }
  }
  out.count = out.measurements.length;
  out.ok = true;
} catch (err) {
  out.error = String(err && err.stack ? err.stack : err);
}
process.stdout.write(JSON.stringify(out) + '\n');
process.exit(out.ok ? 0 : 1);
