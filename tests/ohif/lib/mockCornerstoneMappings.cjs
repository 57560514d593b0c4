'use strict';
/**
 * MOCK of what @ohif/extension-cornerstone's init registers and the SR code needs:
 *  - the measurementService source ('Cornerstone3DTools', '0.1') with one mapping per
 *    annotation type that the real extension maps (same 17 names as its
 *    initMeasurementService: Length, Bidirectional, ... UltrasoundPleuraBLineTool).
 *    The real toMeasurement functions (measurementServiceMappings/*.ts, which compute the
 *    panel's displayText from cached stats) are not exported by the bundle; this mock's
 *    toMeasurement copies the annotation's label/finding verbatim and leaves displayText
 *    empty. It therefore reports the *label* OHIF sets during hydration, not the stats text.
 *  - the 'updateMeasurement' command (extension-cornerstone's commandsModule), recorded only.
 *  - cornerstone metaData provider: OHIF's real MetadataProvider (from @ohif/core) registered
 *    at priority 9999, as extension-cornerstone's init does.
 */
const OHIF = require('@ohif/core');
const csCore = require('@cornerstonejs/core');

const ANNOTATION_TYPES = [
  'Length', 'Crosshairs', 'Bidirectional', 'EllipticalROI', 'CircleROI', 'ArrowAnnotate',
  'CobbAngle', 'Angle', 'RectangleROI', 'PlanarFreehandROI', 'SplineROI', 'CalibrationLine',
  'LivewireContour', 'Probe', 'UltrasoundDirectionalTool', 'UltrasoundPleuraBLineTool',
  'SegmentBidirectional',
];

function registerCornerstoneMocks({ servicesManager, commandsManager, recorder }) {
  const { measurementService } = servicesManager.services;
  const source = measurementService.createSource('Cornerstone3DTools', '0.1');
  const criteria = [{ valueType: measurementService.VALUE_TYPES.POLYLINE, points: 2 }];
  for (const annotationType of ANNOTATION_TYPES) {
    measurementService.addMapping(
      source,
      annotationType,
      criteria,
      () => null,
      (csToolsEventDetail) => {
        const { annotation } = csToolsEventDetail;
        const { metadata = {}, data = {}, annotationUID } = annotation;
        const uids = metadata.referencedImageId
          ? OHIF.classes.MetadataProvider.getUIDsFromImageID(metadata.referencedImageId) || {}
          : {};
        return {
          uid: annotationUID,
          SOPInstanceUID: uids.SOPInstanceUID,
          FrameOfReferenceUID: metadata.FrameOfReferenceUID,
          referenceStudyUID: uids.StudyInstanceUID,
          referenceSeriesUID: uids.SeriesInstanceUID,
          frameNumber: data.frameNumber || (uids.frameNumber ? Number(uids.frameNumber) : 1),
          referencedImageId: metadata.referencedImageId,
          toolName: metadata.toolName,
          metadata,
          label: data.label,
          description: data.description,
          displayText: { primary: [], secondary: [] },
          data: data.cachedStats,
          type: annotationType,
          points: data.handles?.points,
        };
      }
    );
  }
  commandsManager.createContext('CORNERSTONE');
  commandsManager.registerCommand('CORNERSTONE', 'updateMeasurement', {
    commandFn: (args) => {
      recorder.push({ command: 'updateMeasurement', uid: args.uid, code: args.code ?? null });
    },
  });
  // As extensions/cornerstone/src/init.tsx: metaData.addProvider(metadataProvider.get..., 9999)
  const mp = OHIF.classes.MetadataProvider;
  csCore.metaData.addProvider(mp.get.bind(mp), 9999);
  return source;
}

module.exports = { registerCornerstoneMocks, ANNOTATION_TYPES };
