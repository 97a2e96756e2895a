// Open a study in the real OHIF viewer (Debian's chromium, driven by playwright-core; no browser
// download), open its Structured Report the way a radiologist does (double-click the SR series
// in the study browser), and report what the page shows.
//
//   node ohif_sr.mjs VIEWER_URL SR_SERIES_TEXT SCREENSHOT.png [EXPECT_TEXT ...]
//
// Waits until every EXPECT_TEXT appears in the page text (or 120 s pass), takes a screenshot and
// prints one JSON line: {ok, text, svgText, errors, missing}. Exits 1 when something failed (the
// JSON and the screenshot still say what the page showed).
import { chromium } from 'playwright-core';

const [url, seriesText, screenshot, ...expected] = process.argv.slice(2);
const executablePath = process.env.CXR_CHROMIUM || '/usr/bin/chromium';
const out = { ok: false, url, errors: [], missing: expected, text: '', svgText: [] };
const deadline = Date.now() + 150_000;
let browser;

async function pageText(page) {
  return page.evaluate(() => ({
    text: document.body ? document.body.innerText : '',
    svgText: Array.from(document.querySelectorAll('svg text')).map((t) => t.textContent),
  }));
}

try {
  browser = await chromium.launch({
    executablePath,
    // WebGL through SwiftShader (no GPU here); root in CI needs --no-sandbox
    args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader'],
  });
  const page = await browser.newPage({ viewport: { width: 1800, height: 1400 } });
  page.on('pageerror', (e) => out.errors.push(`pageerror: ${e.message}`.slice(0, 500)));
  page.on('console', (m) => {
    if (m.type() === 'error') out.errors.push(`console: ${m.text()}`.slice(0, 300));
  });
  await page.goto(url, { waitUntil: 'load', timeout: 60_000 });
  const series = page.getByText(seriesText).first();
  await series.waitFor({ timeout: 60_000 });
  // the first-visit tour covers the viewport: dismiss it when it shows
  await page.waitForTimeout(1500);
  const skip = page.getByText('Skip all');
  if (await skip.count()) await skip.first().click();
  await series.dblclick();
  // OHIF offers to track (hydrate) the report's measurements; a reader just looks: "No"
  const no = page.getByRole('button', { name: 'No', exact: true });
  try {
    await no.first().waitFor({ timeout: 8_000 });
    await no.first().click();
  } catch {
    // no prompt: nothing to dismiss
  }
  for (;;) {
    Object.assign(out, await pageText(page));
    const all = out.text + '\n' + out.svgText.join('\n');
    out.missing = expected.filter((e) => !all.includes(e));
    if (out.missing.length === 0 || Date.now() > deadline) break;
    await page.waitForTimeout(1000);
  }
  await page.waitForTimeout(1500); // let the last annotations paint before the screenshot
  Object.assign(out, await pageText(page));
  await page.screenshot({ path: screenshot });
  out.ok = out.missing.length === 0;
} catch (err) {
  out.errors.push(String(err && err.stack ? err.stack : err).slice(0, 2000));
  if (browser) {
    try {
      const [page] = browser.contexts().flatMap((c) => c.pages());
      if (page) await page.screenshot({ path: screenshot });
    } catch {
      // the screenshot is best effort once something failed
    }
  }
} finally {
  if (browser) await browser.close();
}
process.stdout.write(JSON.stringify(out) + '\n');
process.exit(out.ok ? 0 : 1);
