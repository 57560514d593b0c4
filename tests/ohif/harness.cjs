#!/usr/bin/env node
'use strict';
/**
 * sononode OHIF SR acceptance harness.
 *
 * Loads DICOM Part 10 files (SR instances + optionally the images they reference), runs
 * OHIF Viewer 3.13's own SR code from @ohif/extension-cornerstone-dicom-sr (SOP class
 * handler -> display set -> load() -> DICOMSRDisplay annotations -> optional hydration),
 * and prints a JSON report of what OHIF would show.
 *
 * Usage: node harness.cjs [--no-hydrate] [--verbose] [--pretty] PATH...
 *   PATH: .dcm files or folders (searched recursively). All files form one "study load".
 */
const { MOCKED_MODULES } = require('./lib/env.cjs');
const fs = require('fs');
const path = require('path');

// ---------------------------------------------------------------- console capture
const captured = [];
let captureOn = false;
const realConsole = {};
for (const level of ['log', 'info', 'warn', 'error', 'debug']) {
  realConsole[level] = console[level].bind(console);
  console[level] = (...args) => {
    if (captureOn) captured.push({ level, text: args.map(fmtArg).join(' ').slice(0, 400) });
    else if (process.env.HARNESS_VERBOSE) realConsole.error(`[${level}]`, ...args);
  };
}
function fmtArg(a) {
  if (a instanceof Error) return `${a.name}: ${a.message}`;
  if (typeof a === 'string') return a;
  try {
    return JSON.stringify(a, (k, v) => (typeof v === 'object' && v && v.byteLength > 64 ? '[binary]' : v)).slice(0, 200);
  } catch {
    return String(a);
  }
}
function takeCaptured() {
  const out = captured.splice(0, captured.length);
  // Adapters' generateToolState logs whole measurement objects; keep the useful lines.
  return out.filter((c) => c.level !== 'debug');
}

// ---------------------------------------------------------------- real OHIF / cornerstone code
const dcmjs = require('dcmjs');
const csCore = require('@cornerstonejs/core');
const csTools = require('@cornerstonejs/tools');
const OHIF = require('@ohif/core');
const srExtension = require('@ohif/extension-cornerstone-dicom-sr');
const { mockDefaultExtension, DATA_SOURCES, imageIdFor, EXT_ID } = require('./lib/mockDefaultExtension.cjs');
const { registerCornerstoneMocks } = require('./lib/mockCornerstoneMappings.cjs');

const SR_EXT_ID = '@ohif/extension-cornerstone-dicom-sr';
const SR_SOP_CLASSES = new Set([
  '1.2.840.10008.5.1.4.1.1.88.11',
  '1.2.840.10008.5.1.4.1.1.88.22',
  '1.2.840.10008.5.1.4.1.1.88.33',
  '1.2.840.10008.5.1.4.1.1.88.34',
]);

function pkgVersion(name) {
  try {
    const p = require.resolve(`${name}/package.json`, { paths: [__dirname] });
    return JSON.parse(fs.readFileSync(p, 'utf8')).version;
  } catch {
    // packages whose "exports" hide package.json
    const p = path.join(__dirname, 'node_modules', ...name.split('/'), 'package.json');
    return fs.existsSync(p) ? JSON.parse(fs.readFileSync(p, 'utf8')).version : null;
  }
}

function listFiles(p) {
  const st = fs.statSync(p);
  if (st.isDirectory()) return fs.readdirSync(p).sort().flatMap((f) => listFiles(path.join(p, f)));
  return [p];
}

function readInstance(file) {
  const buf = fs.readFileSync(file);
  const ab = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  const dicomData = dcmjs.data.DicomMessage.readFile(ab);
  // Same naturalization as OHIF's DICOMweb / local data sources.
  const instance = dcmjs.data.DicomMetaDictionary.naturalizeDataset(dicomData.dict);
  instance._meta = dcmjs.data.DicomMetaDictionary.namifyDataset(dicomData.meta);
  delete instance.PixelData; // DICOMweb metadata carries no pixel data
  instance.imageId = imageIdFor(instance, 1);
  instance.wadoRoot = 'http://harness.invalid/dicomweb';
  instance.__file = file;
  return instance;
}

function errInfo(e) {
  if (!e) return null;
  const frames = String(e.stack || '')
    .split('\n')
    .slice(1, 4)
    .map((s) => s.trim().replace(__dirname + path.sep, ''));
  return { name: e.name, message: e.message, at: frames };
}

function codeOf(seq) {
  const c = Array.isArray(seq) ? seq[0] : seq;
  return c ? `(${c.CodeValue}, ${c.CodingSchemeDesignator}, "${c.CodeMeaning}")` : null;
}

function summarizeCoords(coords) {
  return (coords || []).map((c) => ({
    ValueType: c.ValueType,
    GraphicType: c.GraphicType,
    points: c.GraphicData ? c.GraphicData.length / (c.ValueType === 'SCOORD3D' ? 3 : 2) : 0,
    ReferencedSOPInstanceUID: c.ReferencedSOPSequence?.ReferencedSOPInstanceUID ?? null,
    ReferencedFrameNumber: c.ReferencedSOPSequence?.ReferencedFrameNumber ?? null,
  }));
}

function uidsFromImageId(imageId) {
  if (!imageId) return {};
  return OHIF.classes.MetadataProvider.getUIDsFromImageID(imageId) || {};
}

async function main(argv) {
  const args = argv.filter((a) => !a.startsWith('--'));
  const flags = new Set(argv.filter((a) => a.startsWith('--')));
  if (flags.has('--verbose')) process.env.HARNESS_VERBOSE = '1';
  if (!args.length) {
    realConsole.error('usage: node harness.cjs [--no-hydrate] [--verbose] [--pretty] PATH...');
    process.exit(2);
  }

  const report = {
    harness: 'sononode-ohif-sr-harness',
    packages: Object.fromEntries(
      ['@ohif/extension-cornerstone-dicom-sr', '@ohif/core', '@cornerstonejs/adapters', '@cornerstonejs/core', '@cornerstonejs/tools', 'dcmjs'].map((n) => [n, pkgVersion(n)])
    ),
    mockedModules: MOCKED_MODULES,
    inputs: [],
    setupErrors: [],
    displaySets: [],
    srDisplaySets: [],
  };

  // ------------------------------------------------------------ OHIF services (real classes)
  const commandsManager = new OHIF.CommandsManager();
  const servicesManager = new OHIF.ServicesManager(commandsManager);
  servicesManager.registerServices([
    OHIF.DisplaySetService.REGISTRATION,
    OHIF.MeasurementService.REGISTRATION,
    OHIF.CustomizationService.REGISTRATION,
    OHIF.UINotificationService.REGISTRATION,
  ]);
  const extensionManager = new OHIF.ExtensionManager({
    commandsManager,
    servicesManager,
    appConfig: { defaultDataSourceName: 'mock-dicomweb' },
  });
  servicesManager.setExtensionManager(extensionManager);
  const { displaySetService, measurementService, customizationService } = servicesManager.services;

  const commandLog = [];
  captureOn = true;
  await extensionManager.registerExtension(mockDefaultExtension, {}, DATA_SOURCES);
  await extensionManager.registerExtension(srExtension.default, {}, DATA_SOURCES); // runs preRegistration (tools)
  customizationService.init(extensionManager);
  registerCornerstoneMocks({ servicesManager, commandsManager, recorder: commandLog });
  // Order as in OHIF's longitudinal/basic modes: stack handler before the SR handlers.
  displaySetService.init(extensionManager, [
    `${EXT_ID}.sopClassHandlerModule.stack`,
    `${SR_EXT_ID}.sopClassHandlerModule.dicom-sr`,
    `${SR_EXT_ID}.sopClassHandlerModule.dicom-sr-3d`,
  ]);
  const setupLog = takeCaptured();
  captureOn = false;

  // ------------------------------------------------------------ read files
  const instances = [];
  for (const file of args.flatMap(listFiles)) {
    try {
      const inst = readInstance(file);
      instances.push(inst);
      report.inputs.push({
        file: path.relative(process.cwd(), file),
        SOPClassUID: inst.SOPClassUID,
        Modality: inst.Modality,
        SeriesInstanceUID: inst.SeriesInstanceUID,
        SOPInstanceUID: inst.SOPInstanceUID,
        InstanceNumber: inst.InstanceNumber ?? null,
        ContentDate: inst.ContentDate ?? null,
        ContentTime: inst.ContentTime ?? null,
      });
    } catch (e) {
      report.setupErrors.push({ file, error: errInfo(e) });
    }
  }
  // ------------------------------------------------------------ metadata store + display sets,
  // one call per series, as OHIF's data sources and mode do.
  const bySeries = new Map();
  for (const inst of instances) {
    if (!bySeries.has(inst.SeriesInstanceUID)) bySeries.set(inst.SeriesInstanceUID, []);
    bySeries.get(inst.SeriesInstanceUID).push(inst);
  }
  for (const seriesInstances of bySeries.values()) OHIF.DicomMetadataStore.addInstances(seriesInstances, true);
  // Default: images first (the study's series are listed, then the radiologist opens the SR).
  // --sr-first: the SR series is created and loaded before the image series arrive (their
  // display sets then reach the SR code through its DISPLAY_SETS_ADDED subscription).
  const srFirst = flags.has('--sr-first');
  const isSRSeries = (list) => SR_SOP_CLASSES.has(list[0].SOPClassUID);
  const srSeries = [...bySeries.values()].filter(isSRSeries);
  const imageSeries = [...bySeries.values()].filter((l) => !isSRSeries(l));
  const loadResults = new Map();
  const laterErrors = [];

  function makeSets(list, phase) {
    for (const seriesInstances of list) {
      captureOn = true;
      try {
        displaySetService.makeDisplaySets(seriesInstances, { madeInClient: true });
      } catch (e) {
        (phase === 'images-after-sr-load' ? laterErrors : report.setupErrors).push({
          phase,
          series: seriesInstances[0].SeriesInstanceUID,
          error: errInfo(e),
        });
      }
      captureOn = false;
    }
  }
  const srSetsNow = () =>
    displaySetService.getActiveDisplaySets().filter((ds) => ds.SOPClassHandlerId?.startsWith(SR_EXT_ID));

  async function loadSR(ds) {
    // displaySet.load() = _load -> _getMeasurements -> _checkIfCanAddMeasurementsToDisplaySet
    //                     -> addSRAnnotation (DICOMSRDisplay annotations)
    captureOn = true;
    let result;
    try {
      await ds.load();
      result = { ok: true };
    } catch (e) {
      result = { ok: false, error: errInfo(e) };
    }
    result.console = takeCaptured().filter((c) => c.level !== 'log' || /rehydratable|Measurement/i.test(c.text));
    captureOn = false;
    loadResults.set(ds.displaySetInstanceUID, result);
  }

  if (srFirst) {
    makeSets(srSeries, 'sr');
    for (const ds of srSetsNow()) await loadSR(ds);
    makeSets(imageSeries, 'images-after-sr-load');
  } else {
    makeSets(imageSeries, 'images');
    makeSets(srSeries, 'sr');
  }
  report.order = srFirst ? 'sr-first (SR loaded, then image display sets added)' : 'images-first';
  report.errorsWhenImagesAddedAfterSRLoad = laterErrors;
  report.displaySets = displaySetService.getActiveDisplaySets().map((ds) => ({
    displaySetInstanceUID: ds.displaySetInstanceUID,
    SOPClassHandlerId: ds.SOPClassHandlerId,
    Modality: ds.Modality,
    SeriesInstanceUID: ds.SeriesInstanceUID,
    numImages: ds.images ? ds.images.length : undefined,
    unsupported: ds.unsupported || false,
  }));
  takeCaptured();
  // ------------------------------------------------------------ the SR display sets
  const DICOMSRDisplayToolClass = csTools.state?.tools?.DICOMSRDisplay?.toolClass;
  let srTool = null;
  try {
    srTool = DICOMSRDisplayToolClass ? new DICOMSRDisplayToolClass({}, { configuration: {} }) : null;
  } catch (e) {
    report.setupErrors.push({ what: 'instantiate DICOMSRDisplayTool', error: errInfo(e) });
  }

  const srSets = srSetsNow();

  // What extension-cornerstone's ANNOTATION_ADDED listener does with an annotation:
  // measurementService.annotationToMeasurement(source, toolName, detail) (real @ohif/core code).
  const csSource = measurementService.getSource('Cornerstone3DTools', '0.1');
  function panelFor(annotation) {
    captureOn = true;
    let uid;
    try {
      uid = measurementService.annotationToMeasurement(csSource, annotation.metadata.toolName, { annotation });
    } catch (e) {
      takeCaptured();
      captureOn = false;
      return { listed: false, error: errInfo(e) };
    }
    const logs = takeCaptured();
    captureOn = false;
    const m = uid ? measurementService.getMeasurement(uid) : null;
    return m
      ? { listed: true, label: m.label ?? null, isUnmapped: !!m.isUnmapped }
      : { listed: false, why: logs.map((l) => l.text.slice(0, 60)) };
  }

  for (const ds of srSets) {
    const entry = {
      displaySetInstanceUID: ds.displaySetInstanceUID,
      SOPClassHandlerId: ds.SOPClassHandlerId,
      label: ds.label,
      SeriesInstanceUID: ds.SeriesInstanceUID,
      candidates: ds.instances.map((i) => ({
        SOPInstanceUID: i.SOPInstanceUID,
        InstanceNumber: i.InstanceNumber ?? null,
        ContentDate: i.ContentDate ?? null,
        ContentTime: i.ContentTime ?? null,
        file: path.relative(process.cwd(), i.__file),
      })),
      chosenInstance: {
        SOPInstanceUID: ds.instance.SOPInstanceUID,
        InstanceNumber: ds.instance.InstanceNumber ?? null,
        file: path.relative(process.cwd(), ds.instance.__file),
      },
      documentTitle: codeOf(ds.instance.ConceptNameCodeSequence),
      isImagingMeasurementReport: ds.isImagingMeasurementReport,
      viewport: ds.isImagingMeasurementReport
        ? 'measurement viewport (OHIFCornerstoneSRMeasurementViewport: image + DICOMSRDisplay annotations)'
        : 'text viewport (OHIFCornerstoneSRTextViewport: content tree as text)',
      load: null,
      measurements: [],
      annotations: [],
      isRehydratable: null,
      hydration: null,
      consoleDuringLoad: [],
    };

    if (!loadResults.has(ds.displaySetInstanceUID)) await loadSR(ds);
    const lr = loadResults.get(ds.displaySetInstanceUID);
    entry.load = lr.error ? { ok: false, error: lr.error } : { ok: true };
    entry.consoleDuringLoad = lr.console;

    entry.isLoaded = ds.isLoaded;
    entry.isRehydratable = ds.isRehydratable ?? null;
    entry.measurements = (ds.measurements || []).map((m) => ({
      TrackingIdentifier: m.TrackingIdentifier ?? null,
      TrackingUniqueIdentifier: m.TrackingUniqueIdentifier ?? null,
      graphicType: m.graphicType ?? m.coords?.[0]?.GraphicType ?? null,
      graphicCode: m.graphicCode ?? null,
      geometric: m.graphicCode !== undefined,
      labels: m.labels,
      coords: summarizeCoords(m.coords),
      loaded: m.loaded,
      imageId: m.imageId ?? null,
      ReferencedSOPInstanceUID: m.ReferencedSOPInstanceUID ?? null,
      frameNumber: m.frameNumber ?? null,
      displaySetInstanceUID: m.displaySetInstanceUID ?? null,
    }));

    const mine = new Set((ds.measurements || []).map((m) => m.TrackingUniqueIdentifier));
    const anns = csTools.annotation.state
      .getAllAnnotations()
      .filter((a) => a.metadata?.toolName === 'DICOMSRDisplay' && mine.has(a.data?.TrackingUniqueIdentifier));
    entry.annotations = anns.map((a) => {
      let textBoxLines = null;
      try {
        textBoxLines = srTool ? srTool._getTextBoxLinesFromLabels(a.data.labels || []) : null;
      } catch (e) {
        textBoxLines = { error: errInfo(e) };
      }
      const uids = uidsFromImageId(a.metadata.referencedImageId);
      return {
        toolName: a.metadata.toolName,
        graphicType: a.metadata.graphicType,
        valueType: a.metadata.valueType,
        referencedSOPInstanceUID: uids.SOPInstanceUID ?? null,
        frameNumber: a.data.frameNumber ?? null,
        referencedImageId: a.metadata.referencedImageId,
        'data.label': a.data.label ?? null,
        'data.displayText': a.data.displayText ?? null,
        'data.labels': a.data.labels,
        textBoxLines,
        worldPoints: a.data.handles?.points?.length ?? 0,
        measurementPanel: panelFor(a),
      };
    });

    // --- hydration (what "Track measurements"/hydrate does): hydrateStructuredReport
    if (!flags.has('--no-hydrate') && ds.isImagingMeasurementReport && entry.load.ok) {
      const before = new Set(measurementService.getMeasurements().map((m) => m.uid));
      captureOn = true;
      try {
        const res = srExtension.hydrateStructuredReport({ servicesManager, extensionManager, commandsManager }, ds.displaySetInstanceUID);
        const added = measurementService.getMeasurements().filter((m) => !before.has(m.uid));
        entry.hydration = {
          ok: true,
          attemptedBecause: ds.isRehydratable ? 'isRehydratable=true' : 'forced (isRehydratable=false; OHIF would not offer hydration)',
          result: res,
          measurements: added.map((m) => ({
            toolName: m.toolName,
            label: m.label ?? null,
            finding: m.finding ? { text: m.finding.text, ref: m.finding.ref } : null,
            findingSites: m.findingSites ? m.findingSites.map((f) => ({ text: f.text, ref: f.ref })) : null,
            SOPInstanceUID: m.SOPInstanceUID ?? null,
            frameNumber: m.frameNumber ?? null,
            points: m.points ? m.points.length : 0,
          })),
        };
      } catch (e) {
        entry.hydration = { ok: false, error: errInfo(e) };
      }
      const logs = takeCaptured();
      entry.hydration.console = logs
        .filter((c) => c.level === 'warn' || c.level === 'error' || /^=== /.test(c.text))
        .slice(0, 20);
      captureOn = false;
    }
    report.srDisplaySets.push(entry);
  }
  report.commands = commandLog;
  if (flags.has('--verbose')) report.setupConsole = setupLog;
  process.stdout.write(JSON.stringify(report, null, flags.has('--compact') ? 0 : 2) + '\n');
}

main(process.argv.slice(2)).catch((e) => {
  realConsole.error('harness failed:', e);
  process.exit(1);
});
