'use strict';
// MOCK of @ohif/extension-cornerstone. Its npm package "exports" points at src/index.tsx,
// which is not shipped, and its UMD bundle pulls in vtk/WebGL/React UI, so it cannot be
// required in Node. The SR extension's loader uses only these two enum values (identical
// to extensions/cornerstone/src/enums.ts); OHIFCornerstoneViewport and
// usePositionPresentationStore are used only by the React SR viewport (never rendered here).
module.exports = {
  __esModule: true,
  Enums: {
    CORNERSTONE_3D_TOOLS_SOURCE_NAME: 'Cornerstone3DTools',
    CORNERSTONE_3D_TOOLS_SOURCE_VERSION: '0.1',
  },
  OHIFCornerstoneViewport: () => {
    throw new Error('extension-cornerstone mock: viewport not available in the harness');
  },
  usePositionPresentationStore: () => {
    throw new Error('extension-cornerstone mock: viewport not available in the harness');
  },
};
