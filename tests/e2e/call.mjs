// Two pages of the demo in Debian's headless Chromium complete a real WebRTC video call over
// callbus, then a reject and an end path, each checked on both pages.
// Usage: CALLBUS_URL=http://127.0.0.1:PORT node tests/e2e/call.mjs [screenshot.png]
import { launch, check, open as openAs, connected, TIMEOUT } from "./browser.mjs";

const base = process.env.CALLBUS_URL;
if (!base) throw new Error("CALLBUS_URL is required");
const screenshot = process.argv[2];
const browser = await launch();
const open = (user) => openAs(browser, base, user);

const alice = await open("alice");
const bob = await open("bob");

async function call(type) {
  await alice.fill("#callee", "bob");
  await alice.click(type === "video" ? "#call-video" : "#call-voice");
  await bob.waitForSelector("#incoming:not(.hidden)", { timeout: TIMEOUT });
  check((await bob.textContent("#incoming-from")) === "Alice", "bob sees Alice calling");
}

// 1. A real video call: both peer connections connect and bob decodes video frames.
await call("video");
await bob.click("#accept-btn");
for (const [name, page] of [["alice", alice], ["bob", bob]]) await connected(page, name);
async function framesDecoded(page) {
  return page.evaluate(async () => {
    const stats = await window.demo.call.pc.getStats();
    let decoded = 0;
    stats.forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "video") decoded = s.framesDecoded || 0; });
    return decoded;
  });
}
let decoded = 0;
for (const deadline = Date.now() + TIMEOUT; decoded === 0 && Date.now() < deadline;) {
  decoded = await framesDecoded(bob);
  if (decoded === 0) await bob.waitForTimeout(200);
}
check(decoded > 0, `bob decodes video frames (framesDecoded > 0: ${decoded})`);
if (screenshot) {
  await bob.waitForTimeout(500); // let a few frames paint for the picture
  await bob.screenshot({ path: screenshot });
}

// 2. End path: alice hangs up; both pages see the call end.
await alice.click("#end-btn");
for (const [name, page] of [["alice", alice], ["bob", bob]]) {
  await page.waitForFunction(() => window.demo.call === null && window.demo.lastEnd && window.demo.lastEnd.reason === "ended", null, { timeout: TIMEOUT });
  check(true, `${name} sees the call ended`);
}
const history = await bob.evaluate(async () => (await fetch("/api/calls/?limit=1", { headers: { Authorization: `Bearer ${window.demo.token}` } })).json());
check(history.results[0].status === "ended", "bob's history shows the ended call");

// 3. Reject path: bob rejects a voice call; both pages see it.
await call("voice");
await bob.click("#reject-btn");
for (const [name, page] of [["alice", alice], ["bob", bob]]) {
  await page.waitForFunction(() => window.demo.call === null && window.demo.lastEnd && window.demo.lastEnd.reason === "rejected", null, { timeout: TIMEOUT });
  check(true, `${name} sees the call rejected`);
}
for (const [name, page] of [["alice", alice], ["bob", bob]]) {
  const errors = await page.evaluate(() => window.demo.errors);
  check(errors.length === 0, `${name}'s page logged no errors ${JSON.stringify(errors)}`);
}

await browser.close();
console.log("e2e: all checks passed");
