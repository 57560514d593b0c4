'use strict';
// MOCK of @ohif/core/src/contextProviders/SystemProvider (a source path not shipped in the
// @ohif/core npm package). The SR extension uses useSystem() only in its React viewport.
module.exports = {
  __esModule: true,
  useSystem: () => {
    throw new Error('SystemProvider mock: React viewport components are not rendered by the harness');
  },
};
