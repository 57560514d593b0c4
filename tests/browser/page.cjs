#!/usr/bin/env node
/*
 * Loads one page of a sononode in headless Chromium and prints, as JSON, what the page did:
 * every request it made (through the DevTools Protocol's request interception: a request
 * to any origin other than the page's own is recorded and aborted, so nothing ever leaves
 * the machine), the responses, failed loads, console messages and uncaught errors, its
 * visible text, and a screenshot.
 *
 *   node page.cjs --url URL [--wait CSS] [--screenshot PNG] [--width 1280] [--height 800]
 *                 [--full-page] [--timeout MS]
 *
 * --wait is a CSS selector the page must match (then the network must be idle for 500 ms).
 * The browser is CHROMIUM or /usr/bin/chromium. The report's "error" is null when the page
 * loaded and matched --wait within --timeout; the exit status is 0 whenever a report is
 * printed.
 */
"use strict";

const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const puppeteer = require("puppeteer-core");

function parseArgs(argv) {
  const args = { width: 1280, height: 800, timeout: 60000, fullPage: false };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(name + " needs a value");
      return argv[++i];
    };
    if (name === "--url") args.url = value();
    else if (name === "--wait") args.wait = value();
    else if (name === "--screenshot") args.screenshot = value();
    else if (name === "--width") args.width = Number(value());
    else if (name === "--height") args.height = Number(value());
    else if (name === "--timeout") args.timeout = Number(value());
    else if (name === "--full-page") args.fullPage = true;
    else throw new Error("unknown argument " + name);
  }
  if (!args.url) throw new Error("--url is required");
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const origin = new URL(args.url).origin;
  const report = {
    url: args.url, origin: origin, error: null, requests: [], foreign: [], responses: [],
    failed: [], console: [], pageErrors: [], text: "", title: "", href: "",
    sessionStorageKeys: [], waitMatches: 0, screenshot: null,
  };
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "sononode-chromium-"));
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    userDataDir: profile,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio"],
  });
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: args.width, height: args.height });
    await page.setRequestInterception(true);
    page.on("request", (request) => {
      const url = request.url();
      const local = url.startsWith("data:") || url.startsWith("blob:") ||
        url.startsWith("about:") || new URL(url).origin === origin;
      report.requests.push({ url: url, method: request.method(), type: request.resourceType() });
      if (local) {
        request.continue();
      } else {
        report.foreign.push(url);
        request.abort("blockedbyclient");
      }
    });
    page.on("response", (response) => {
      report.responses.push({ url: response.url(), status: response.status() });
    });
    page.on("requestfailed", (request) => {
      report.failed.push({ url: request.url(), error: (request.failure() || {}).errorText || "" });
    });
    page.on("console", (message) => {
      const where = message.location() || {};
      report.console.push({ type: message.type(), text: message.text(), url: where.url || "" });
    });
    page.on("pageerror", (error) => {
      report.pageErrors.push(String(error && error.stack ? error.stack : error));
    });
    try {
      await page.goto(args.url, { waitUntil: "load", timeout: args.timeout });
      if (args.wait) {
        await page.waitForSelector(args.wait, { timeout: args.timeout });
      }
      await page.waitForNetworkIdle({ idleTime: 500, timeout: args.timeout });
      if (args.wait) report.waitMatches = (await page.$$(args.wait)).length;
    } catch (error) {
      report.error = String(error && error.message ? error.message : error);
    }
    report.title = await page.title();
    report.href = page.url();
    report.text = await page.evaluate(() => (document.body ? document.body.innerText : ""));
    report.sessionStorageKeys = await page.evaluate(() => {
      try {
        return Object.keys(window.sessionStorage);
      } catch (_) {
        return []; /* an error page has no storage */
      }
    });
    if (args.screenshot) {
      await page.screenshot({ path: args.screenshot, fullPage: args.fullPage });
      report.screenshot = args.screenshot;
    }
  } finally {
    await browser.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  process.stdout.write(JSON.stringify(report) + "\n");
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error) + "\n");
  process.exit(1);
});
