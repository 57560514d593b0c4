'use strict';
// MOCK of @ohif/i18n (not published to npm at 3.13.x; bundled inside the OHIF app).
// The SR extension only calls i18n.t('Series') / i18n.t('SR') to build a display-set label.
// English i18next with no loaded namespace returns the key, which is what this does.
const i18n = { t: (key) => key, language: 'en-US' };
module.exports = { __esModule: true, default: i18n, t: i18n.t };
