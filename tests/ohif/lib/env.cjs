'use strict';
/**
 * Node environment for OHIF's browser bundles.
 *
 * 1. Minimal browser globals (MOCKS). @ohif/core's UMD bundle evaluates, at load time,
 *    a bundled Mousetrap (needs `window`, `document.addEventListener`), a bundled
 *    library that reads `navigator.platform`, and code that references `self`.
 *    Nothing here renders or dispatches events; these objects only let the bundles load.
 * 2. Module-resolution redirects (MOCKS) for the four imports of the SR extension that
 *    are not installable/loadable in Node (see mocks/*.cjs for why each is mocked).
 *
 * Everything else (@ohif/core, @ohif/extension-cornerstone-dicom-sr, @cornerstonejs/core,
 * @cornerstonejs/tools, @cornerstonejs/adapters, dcmjs, gl-matrix) is the real npm code.
 */
const path = require('path');
const Module = require('module');

function noop() {}
// A detached, non-rendering element: an EventTarget (OHIF's PubSubService dispatches a
// CustomEvent on document.body for every service event before calling its listeners).
function fakeElement() {
  return Object.assign(new EventTarget(), {
    style: {},
    setAttribute: noop,
    appendChild: noop,
    removeChild: noop,
    getContext: () => null,
  });
}

if (typeof globalThis.window === 'undefined') globalThis.window = globalThis;
if (typeof globalThis.self === 'undefined') globalThis.self = globalThis;
if (typeof globalThis.navigator === 'undefined') {
  Object.defineProperty(globalThis, 'navigator', {
    value: { platform: 'Linux x86_64', userAgent: 'node', language: 'en-US', hardwareConcurrency: 1 },
    configurable: true,
  });
}
if (typeof globalThis.document === 'undefined') {
  globalThis.document = {
    addEventListener: noop,
    removeEventListener: noop,
    attachEvent: noop,
    createElement: fakeElement,
    createElementNS: fakeElement,
    querySelector: () => null,
    getElementById: () => null,
    head: fakeElement(),
    body: fakeElement(),
    documentElement: fakeElement(),
  };
}
// @cornerstonejs/tools annotationState.addAnnotation() tests `selector instanceof HTMLDivElement`.
for (const name of ['HTMLElement', 'HTMLDivElement', 'HTMLCanvasElement']) {
  if (typeof globalThis[name] === 'undefined') globalThis[name] = class {};
}
if (typeof globalThis.location === 'undefined') {
  globalThis.location = { search: '', href: 'http://localhost/', origin: 'http://localhost', pathname: '/' };
}

const MOCKS = {
  '@ohif/i18n': path.join(__dirname, '..', 'mocks', 'ohif-i18n.cjs'),
  '@ohif/ui-next': path.join(__dirname, '..', 'mocks', 'ohif-ui-next.cjs'),
  '@ohif/core/src/contextProviders/SystemProvider': path.join(__dirname, '..', 'mocks', 'ohif-system-provider.cjs'),
  '@ohif/extension-cornerstone': path.join(__dirname, '..', 'mocks', 'ohif-extension-cornerstone.cjs'),
};

const origResolve = Module._resolveFilename;
Module._resolveFilename = function resolveWithMocks(request, parent, ...rest) {
  if (Object.prototype.hasOwnProperty.call(MOCKS, request)) return MOCKS[request];
  return origResolve.call(this, request, parent, ...rest);
};

module.exports = { MOCKED_MODULES: Object.keys(MOCKS) };
