// A phone's blink, in Chromium: bob's page reaches callbus through a TCP proxy that the test
// takes offline (every connection reset, new ones refused: Playwright's network emulation
// would leave the open WebSocket up) while alice calls him. The ring and the offer wait in
// bob's persistent session (MQTT.js `clean: false`); when the proxy lets him back, MQTT.js
// reconnects, the session resumes with them, and the call completes.
// Usage: CALLBUS_URL=http://127.0.0.1:PORT node tests/e2e/resume.mjs
import net from "node:net";
import { launch, check, open, connected, TIMEOUT } from "./browser.mjs";

const base = process.env.CALLBUS_URL;
if (!base) throw new Error("CALLBUS_URL is required");

class Proxy {
  constructor(host, port) {
    Object.assign(this, { host, port, online: true, sockets: new Set() });
  }

  async listen() {
    this.server = net.createServer((client) => this.accept(client));
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    return this.server.address().port;
  }

  accept(client) {
    if (!this.online) return client.resetAndDestroy();
    const upstream = net.connect(this.port, this.host);
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      this.sockets.add(a);
      a.on("error", () => {});
      a.on("close", () => { this.sockets.delete(a); b.destroy(); });
      a.pipe(b);
    }
  }

  offline() {
    this.online = false;
    for (const socket of this.sockets) socket.resetAndDestroy();
  }

  back() { this.online = true; }
}

const target = new URL(base);
const proxy = new Proxy(target.hostname, Number(target.port));
const proxied = `http://127.0.0.1:${await proxy.listen()}`;
const browser = await launch();
const alice = await open(browser, base, "alice");
const bob = await open(browser, proxied, "bob");

proxy.offline();
await bob.waitForFunction(() => !window.demo.connected, null, { timeout: TIMEOUT });
check(true, "bob's page lost its connection");

// Alice calls while bob is away: the ring, the offer and her candidates are queued for him.
await alice.fill("#callee", "bob");
await alice.click("#call-video");
await alice.waitForFunction(() => window.demo.call && window.demo.call.pc && window.demo.call.pc.iceGatheringState === "complete", null, { timeout: TIMEOUT });
check(true, "alice sent her offer and candidates while bob was away");
check(await bob.isHidden("#incoming"), "bob's page did not ring while offline");

proxy.back();
await bob.waitForSelector("#incoming:not(.hidden)", { timeout: TIMEOUT });
check((await bob.textContent("#incoming-from")) === "Alice", "back online, bob's page rings for Alice");
check(await bob.evaluate(() => window.demo.events.some((e) => e.type === "call.offer")), "bob's page got the queued offer");
await bob.click("#accept-btn");
for (const [name, page] of [["alice", alice], ["bob", bob]]) await connected(page, name);
check(await bob.evaluate(() => !window.demo.events.some((e) => e.type === "error")), "callbus sent bob's page no error event");

await browser.close();
proxy.server.close();
console.log("e2e resume: all checks passed");
