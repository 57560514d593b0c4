'use strict';
// MOCK of @ohif/ui-next (not published to npm at 3.13.x). The SR extension uses only
// useViewportGrid(), inside the React SR viewport component, which the harness never renders.
module.exports = {
  __esModule: true,
  useViewportGrid: () => {
    throw new Error('@ohif/ui-next mock: React viewport components are not rendered by the harness');
  },
};
