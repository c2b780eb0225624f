// MQTT.js in Node against callbus over WebSocket: a refused CONNECT must reach the client as
// its CONNACK reason (MQTT 5 "bad user name or password", MQTT 3.1.1 "not authorized"),
// not as a broken pipe. Prints one line per case; exits non-zero if a case fails.
import mqtt from "mqtt";

const url = process.env.CALLBUS_URL; // ws://127.0.0.1:PORT/mqtt
const token = process.env.CALLBUS_TOKEN;

function attempt(options) {
  return new Promise((resolve) => {
    const client = mqtt.connect(url, { reconnectPeriod: 0, connectTimeout: 5000, ...options });
    const done = (result) => {
      client.end(true);
      resolve(result);
    };
    client.on("connect", () => done({ connected: true }));
    client.on("error", (e) => done({ code: e.code, message: e.message }));
    client.on("close", () => done({ closed: true }));
  });
}

const cases = [
  {
    name: "MQTT 5 with a bad token is refused with reason 0x86",
    options: { protocolVersion: 5, username: "alice", password: "not-a-token", clientId: "v5-refusal" },
    expect: (r) => r.code === 0x86,
  },
  {
    name: "MQTT 5 with a username that is not the token's subject is refused with reason 0x87",
    options: { protocolVersion: 5, username: "mallory", password: token, clientId: "v5-mismatch" },
    expect: (r) => r.code === 0x87,
  },
  {
    name: "MQTT 5 with a good token connects",
    options: { protocolVersion: 5, username: "alice", password: token, clientId: "v5-ok" },
    expect: (r) => r.connected === true,
  },
  {
    name: "a bad token is refused with code 5",
    options: { protocolVersion: 4, username: "alice", password: "not-a-token", clientId: "bad-token" },
    expect: (r) => r.code === 5,
  },
];

let failed = false;
for (const c of cases) {
  const result = await attempt(c.options);
  const ok = c.expect(result);
  failed ||= !ok;
  console.log(`${ok ? "ok" : "FAILED"}: ${c.name}: ${JSON.stringify(result)}`);
}
process.exit(failed ? 1 : 0);
