'use strict';
/**
 * MOCK of the parts of @ohif/extension-default (and of the OHIF app glue) that the SR
 * extension calls. @ohif/extension-default is not loadable in Node (React UI), so this
 * stands in for it, registered under the same extension id so the handler ids match.
 *
 *  - data source "mock-dicomweb": getImageIdsForDisplaySet / getImageIdsForInstance with
 *    the DICOMweb data source's imageId scheme (wadors:<root>/studies/../series/../
 *    instances/../frames/<n>, frames 1..NumberOfFrames); retrieve.bulkDataURI rejects
 *    (the harness reads whole Part 10 files, so no BulkDataURI is ever present).
 *  - SOP class handler "stack": one ImageSet (real @ohif/core ImageSet) per series of
 *    single-frame images and one per multi-frame instance, like the default stack handler.
 *  - SOP class handler "not-supported-display-sets-handler": DisplaySetService falls back
 *    to it for unknown SOP classes.
 *  - customization module "default": the values @ohif/extension-default registers that the
 *    SR code reads ('panelMeasurement.disableEditing', onBeforeSRAddMeasurement,
 *    onBeforeDicomStore, codingValues).
 */
const OHIF = require('@ohif/core');

const { ImageSet } = OHIF.classes;
const EXT_ID = '@ohif/extension-default';
const WADO_ROOT = 'http://harness.invalid/dicomweb';
const IMAGE_SOP_CLASSES = [
  '1.2.840.10008.5.1.4.1.1.6.1', // US Image
  '1.2.840.10008.5.1.4.1.1.3.1', // US Multi-frame
  '1.2.840.10008.5.1.4.1.1.6.2', // Enhanced US Volume
  '1.2.840.10008.5.1.4.1.1.7', // Secondary Capture
  '1.2.840.10008.5.1.4.1.1.7.4', // Multi-frame True Color SC
  '1.2.840.10008.5.1.4.1.1.2', // CT
  '1.2.840.10008.5.1.4.1.1.4', // MR
  '1.2.840.10008.5.1.4.1.1.1', // CR
  '1.2.840.10008.5.1.4.1.1.1.1', // DX
];

function imageIdFor(instance, frame) {
  const { StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID } = instance;
  return `wadors:${WADO_ROOT}/studies/${StudyInstanceUID}/series/${SeriesInstanceUID}/instances/${SOPInstanceUID}/frames/${frame || 1}`;
}

function createDataSource() {
  const ds = {
    getImageIdsForInstance({ instance, frame }) {
      return imageIdFor(instance, frame);
    },
    getImageIdsForDisplaySet(displaySet) {
      const images = displaySet.images;
      const imageIds = [];
      if (!images) return imageIds;
      images.forEach((instance) => {
        const n = Number(instance.NumberOfFrames) || 1;
        if (n > 1) for (let f = 1; f <= n; f++) imageIds.push(ds.getImageIdsForInstance({ instance, frame: f }));
        else imageIds.push(ds.getImageIdsForInstance({ instance }));
      });
      return imageIds;
    },
    retrieve: {
      bulkDataURI: async () => {
        throw new Error('mock data source: bulkDataURI not supported (harness reads Part 10 files)');
      },
    },
    getConfig: () => ({ wadoRoot: WADO_ROOT }),
  };
  return ds;
}

function makeImageSet(instances, isMultiFrame) {
  const first = instances[0];
  const imageSet = new ImageSet(instances);
  imageSet.setAttributes({
    displaySetInstanceUID: imageSet.uid,
    SeriesDate: first.SeriesDate,
    SeriesTime: first.SeriesTime,
    SeriesInstanceUID: first.SeriesInstanceUID,
    StudyInstanceUID: first.StudyInstanceUID,
    SeriesNumber: first.SeriesNumber || 0,
    SOPClassUID: first.SOPClassUID,
    SeriesDescription: first.SeriesDescription || '',
    Modality: first.Modality,
    FrameOfReferenceUID: first.FrameOfReferenceUID,
    isMultiFrame,
    numImageFrames: isMultiFrame ? Number(first.NumberOfFrames) : instances.length,
    SOPClassHandlerId: `${EXT_ID}.sopClassHandlerModule.stack`,
    isReconstructable: false,
    madeInClient: false,
  });
  return imageSet;
}

function getDisplaySetsFromSeries(instances) {
  const single = [];
  const sets = [];
  for (const inst of instances) {
    if (Number(inst.NumberOfFrames) > 1) sets.push(makeImageSet([inst], true));
    else single.push(inst);
  }
  if (single.length) {
    OHIF.utils.sortStudyInstances(single);
    sets.unshift(makeImageSet(single, false));
  }
  return sets;
}

const mockDefaultExtension = {
  id: EXT_ID,
  getDataSourcesModule: () => [
    { name: 'mock-dicomweb', type: 'webApi', createDataSource },
  ],
  getSopClassHandlerModule: () => [
    { name: 'stack', sopClassUids: IMAGE_SOP_CLASSES, getDisplaySetsFromSeries },
    {
      name: 'not-supported-display-sets-handler',
      sopClassUids: [],
      getDisplaySetsFromSeries: (instances) => [
        {
          displaySetInstanceUID: OHIF.utils.guid(),
          SeriesInstanceUID: instances[0].SeriesInstanceUID,
          StudyInstanceUID: instances[0].StudyInstanceUID,
          SOPClassUID: instances[0].SOPClassUID,
          Modality: instances[0].Modality,
          instances,
          unsupported: true,
          SOPClassHandlerId: `${EXT_ID}.sopClassHandlerModule.not-supported-display-sets-handler`,
        },
      ],
    },
  ],
  getCustomizationModule: () => [
    {
      name: 'default',
      value: {
        'panelMeasurement.disableEditing': false,
        onBeforeSRAddMeasurement: ({ measurement }) => measurement,
        onBeforeDicomStore: ({ dicomDict }) => dicomDict,
        codingValues: {},
      },
    },
  ],
};

const DATA_SOURCES = [
  {
    namespace: `${EXT_ID}.dataSourcesModule.mock-dicomweb`,
    sourceName: 'mock-dicomweb',
    configuration: {},
  },
];

module.exports = { mockDefaultExtension, DATA_SOURCES, imageIdFor, EXT_ID };
