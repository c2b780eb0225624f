// Shared by the browser tests: Debian's Chromium through playwright-core, with the flags a
// machine with no network needs, and the demo page's sign-in.
import { chromium } from "playwright-core";

export const TIMEOUT = 20000;

// --allow-loopback-in-peer-connection makes Chromium (playwright gives each launch a fresh
// profile directory) gather host candidates on loopback; without it the call never connects.
// The fake-media flags give a test pattern camera and skip the permission prompt.
export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
      "--allow-loopback-in-peer-connection",
    ],
    headless: true,
  });
}

export function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

// Opens the demo at `base` and signs in as `user`; resolves once its MQTT session is up.
export async function open(browser, base, user) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => console.log(`[${user}] page error: ${e.message}`));
  await page.goto(base);
  await page.fill("#user-id", user);
  await page.fill("#user-name", user[0].toUpperCase() + user.slice(1));
  await page.click("#signin-btn");
  await page.waitForFunction(() => window.demo.connected, null, { timeout: TIMEOUT });
  return page;
}

// Waits until the page's RTCPeerConnection is connected.
export async function connected(page, name) {
  await page.waitForFunction(() => window.demo.call && window.demo.call.pc && window.demo.call.pc.connectionState === "connected", null, { timeout: TIMEOUT });
  check(true, `${name}'s RTCPeerConnection is connected`);
}
