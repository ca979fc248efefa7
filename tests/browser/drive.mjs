// Drives the demo page in real Chromium (Debian's, through playwright-core) for tests/test_browser.py.
//
//   node tests/browser/drive.mjs SCENARIO URL MIC.wav OUT_DIR
//
// Prints one JSON line with what the page showed and its window.duplexStats; exits 1 with
// {"error": ...} (and the page's console) when a step times out or fails.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const [scenario, url, micWav, outDir] = process.argv.slice(2);
const STEP_MS = Number(process.env.BROWSER_STEP_TIMEOUT_MS ?? 60000);
const consoleLines = [];
const pages = []; // every page opened, to report what each showed when a step fails

async function launch() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "duplex-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    ignoreHTTPSErrors: true,
    viewport: { width: 900, height: 900 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--use-fake-ui-for-media-stream",
      "--use-fake-device-for-media-stream",
      `--use-file-for-fake-audio-capture=${micWav}`,
      "--ignore-certificate-errors",
      "--autoplay-policy=no-user-gesture-required",
      "--disable-quic",
      "--no-first-run",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const close = async () => {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  };
  return { context, close };
}

async function openPage(context, { initScript } = {}) {
  const page = await context.newPage();
  page.on("console", (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`[pageerror] ${e.message}`));
  pages.push(page);
  if (initScript) await page.addInitScript(initScript);
  await page.goto(url);
  return page;
}

const stats = (page) => page.evaluate(() => ({ ...window.duplexStats }));
const texts = (page, selector) => page.$$eval(selector, (els) => els.map((e) => e.textContent));
const waitStats = (page, predicate, arg) =>
  page.waitForFunction(predicate, arg, { timeout: STEP_MS, polling: 50 });

async function shown(page) {
  return {
    state: await page.textContent("#state"),
    queue: await page.textContent("#queue"),
    message: await page.textContent("#message"),
    users: await texts(page, ".turn .user"),
    replies: await texts(page, ".turn .assistant"),
    timings: await texts(page, ".turn .timings"),
    stats: await stats(page),
  };
}

async function failOnBadAudio(page) {
  const { framingErrors } = await stats(page);
  if (framingErrors > 0) throw new Error(`reply audio is not length-prefixed packets (${framingErrors} framing errors)`);
}

// Start the call with the keyboard, as a person without a mouse would: Tab to the button, press Enter.
async function startWithKeyboard(page) {
  for (let i = 0; i < 10; i++) {
    await page.keyboard.press("Tab");
    if (await page.evaluate(() => document.activeElement?.id === "start")) break;
  }
  const focus = await page.evaluate(() => {
    const el = document.activeElement;
    const style = getComputedStyle(el);
    return { id: el.id, label: el.textContent, outline: style.outlineStyle, focusVisible: el.matches(":focus-visible") };
  });
  await page.keyboard.press("Enter");
  return focus;
}

const scenarios = {
  // Ask the question; wait for the transcript, the reply text and played reply audio.
  async conversation(context) {
    const page = await openPage(context);
    const focus = await startWithKeyboard(page);
    await waitStats(page, () => window.duplexStats.state === "live");
    // Unreadable reply audio ends the wait at once: no amount of waiting would play it.
    await waitStats(
      page,
      () =>
        window.duplexStats.framingErrors > 0 ||
        ([...document.querySelectorAll(".turn .user")].some((e) => e.textContent.trim()) &&
          [...document.querySelectorAll(".turn .assistant")].some((e) => e.textContent.trim()) &&
          window.duplexStats.samplesPlayed > 0),
    );
    await failOnBadAudio(page);
    // The latencies (with how the end of the turn was decided) arrive with response.done, after the reply.
    await page.waitForSelector(".turn .timings", { timeout: STEP_MS });
    const voiceShown = await page.isVisible("#voice");
    const voiceOptions = await page.$eval("#voice", (s) => s.options.length);
    await page.screenshot({ path: path.join(outDir, "browser_demo.png"), fullPage: true });
    await page.setViewportSize({ width: 390, height: 844 });
    await page.screenshot({ path: path.join(outDir, "browser_demo_phone.png"), fullPage: true });
    const result = { focus, voiceShown, voiceOptions, ...(await shown(page)) };
    await page.click("#hangup");
    await waitStats(page, () => window.duplexStats.state === "closed");
    result.afterHangup = await page.textContent("#state");
    return result;
  },

  // One worker, two pages: the second waits at position 1 with a falling countdown, then gets the worker.
  async queue(context) {
    const first = await openPage(context);
    await first.click("#start");
    await waitStats(first, () => window.duplexStats.state === "live");
    const second = await openPage(context);
    await second.click("#start");
    await waitStats(second, () => window.duplexStats.state === "queued" && window.duplexStats.etaSeconds > 0);
    const before = await shown(second);
    // Wait for the countdown to fall by a whole second, not for a fixed time.
    await waitStats(second, (eta) => window.duplexStats.etaSeconds <= eta - 1, before.stats.etaSeconds);
    const after = await shown(second);
    await first.click("#hangup");
    await waitStats(second, () => window.duplexStats.state === "live");
    // The two pages hear about the hang-up on different sockets: wait for the first page's own close.
    await waitStats(first, () => window.duplexStats.state === "closed");
    return { before, after, firstAfterHangup: await first.textContent("#state"), secondLive: await shown(second) };
  },

  // Reply audio playing, then "Stop reply": the clear must empty the page's playback buffer at once.
  async bargein(context) {
    const page = await openPage(context);
    await page.click("#start");
    await waitStats(
      page,
      () =>
        window.duplexStats.framingErrors > 0 ||
        (window.duplexStats.samplesPlayed > 0 && window.duplexStats.bufferedSamples > 0),
    );
    await failOnBadAudio(page);
    const clearsBefore = (await stats(page)).clears;
    await page.click("#interrupt");
    await waitStats(
      page,
      (n) => window.duplexStats.clears > n && window.duplexStats.lastClearToEmptyMs !== null,
      clearsBefore,
    );
    return shown(page);
  },

  // No WebCodecs: the page says so, sends pcm16 instead, and shows replies as text only.
  async nocodecs(context) {
    const page = await openPage(context, {
      initScript: () => {
        delete window.AudioEncoder;
        delete window.AudioDecoder;
      },
    });
    await page.click("#start");
    await waitStats(page, () => window.duplexStats.state === "live");
    await waitStats(page, () =>
      [...document.querySelectorAll(".turn .assistant")].some((e) => e.textContent.trim()),
    );
    return shown(page);
  },

  // The microphone is refused: a clear message, no connection.
  async micdenied(context) {
    const page = await openPage(context, {
      initScript: () => {
        navigator.mediaDevices.getUserMedia = () =>
          Promise.reject(new DOMException("Permission denied", "NotAllowedError"));
      },
    });
    await page.click("#start");
    await waitStats(page, () => window.duplexStats.state === "error");
    return shown(page);
  },

  // The other controls: pick the second voice (the server confirms it), then pause and resume.
  async controls(context) {
    const page = await openPage(context);
    await page.click("#start");
    await waitStats(page, () => window.duplexStats.state === "live");
    const voiceShown = await page.isVisible("#voice");
    const choice = await page.$eval("#voice", (s) => s.options[1]?.value);
    await page.selectOption("#voice", choice);
    await waitStats(page, (v) => window.duplexStats.voice === v, choice);
    const pauseButton = () => page.$eval("#pause", (b) => [b.textContent, b.getAttribute("aria-pressed")]);
    await page.click("#pause");
    await waitStats(page, () => window.duplexStats.state === "paused");
    const paused = { button: await pauseButton(), activity: await page.textContent("#activity") };
    await page.click("#pause");
    await waitStats(page, () => window.duplexStats.state === "live");
    return { voiceShown, choice, paused, resumed: { button: await pauseButton() }, ...(await shown(page)) };
  },

  // A wrong API key: the server refuses, and the page says what to do.
  async badkey(context) {
    const page = await openPage(context);
    await page.click("#start");
    await waitStats(page, () => window.duplexStats.state === "error");
    return shown(page);
  },
};

const browser = await launch();
let code = 0;
try {
  if (!scenarios[scenario]) throw new Error(`unknown scenario ${scenario}`);
  console.log(JSON.stringify(await scenarios[scenario](browser.context)));
} catch (err) {
  const pagesShown = await Promise.all(pages.map((p) => shown(p).catch((e) => String(e))));
  console.log(JSON.stringify({ error: String(err?.message ?? err), pages: pagesShown, console: consoleLines.slice(-40) }));
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
