// callbus demo: sign in with a development token, then call another user. Signaling goes over
// MQTT (MQTT.js over WebSocket), call state over the REST API. `window.demo` exposes the state
// so the end-to-end test can observe the page.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  me: null, token: null, conversation: null, client: null, deviceId: null,
  call: null, // {id, type, role: "caller"|"callee", peer, pc, pendingCandidates, offer}
  seen: new Set(), events: [], errors: [], connected: false,
};
window.demo = state;

function log(text, isError) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (isError) { li.className = "err"; state.errors.push(text); }
  $("log").prepend(li);
}

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: { "Content-Type": "application/json", ...(state.token ? { Authorization: `Bearer ${state.token}` } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const msg = `${method} ${path}: ${res.status} ${data.error || ""}`;
    log(msg, true);
    throw new Error(msg);
  }
  return data;
}

function show(id, visible) { $(id).classList.toggle("hidden", !visible); }

async function signIn() {
  const userId = $("user-id").value.trim();
  const name = $("user-name").value.trim() || userId;
  const conversation = $("conversation").value.trim() || "demo";
  const data = await api("POST", "/api/dev/token", { user_id: userId, username: name, conversation_id: conversation });
  state.me = data.user_id; state.token = data.token; state.conversation = conversation;
  state.deviceId = `web-${Math.random().toString(16).slice(2, 10)}`;
  $("whoami").textContent = `${data.username} (${data.user_id}) in ${conversation}`;
  connect();
}

function connect() {
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/mqtt`;
  const client = mqtt.connect(url, {
    username: state.me, password: state.token, clientId: state.deviceId,
    protocolVersion: 5, keepalive: 30, reconnectPeriod: 2000,
    clean: false, properties: { sessionExpiryInterval: 600 }, // kept through a blink
  });
  state.client = client;
  client.on("connect", () => {
    client.subscribe([`users/${state.me}/notifications`], { qos: 1 }, (err) => {
      if (err) { log(`subscribe failed: ${err.message}`, true); return; }
      state.connected = true;
      $("status").textContent = "online"; $("status").classList.add("online");
      show("signin", false); show("dialer", true); show("history-card", true);
      refreshHistory();
    });
  });
  client.on("close", () => { state.connected = false; $("status").textContent = "offline"; $("status").classList.remove("online"); });
  client.on("error", (e) => log(`MQTT: ${e.message}`, true));
  client.on("message", (topic, payload) => {
    let msg;
    try { msg = JSON.parse(payload.toString()); } catch { return; }
    if (msg.id && state.seen.has(msg.id)) return; // same event on chat and notifications
    if (msg.id) state.seen.add(msg.id);
    state.events.push(msg);
    onEvent(msg);
  });
}

function publish(msg) {
  state.client.publish(`chat/${state.conversation}`, JSON.stringify(msg), { qos: 1 });
}

function onEvent(msg) {
  switch (msg.type) {
    case "notification.created": {
      const p = msg.payload || {};
      if (/^incoming_(voice|video)_call$/.test(p.verb || "")) {
        incoming(p);
      } else {
        log(`notification: ${p.verb || "?"} from ${(p.actor && p.actor.username) || "?"}`);
      }
      break;
    }
    case "call.offer": onOffer(msg); break;
    case "call.answer": onAnswer(msg); break;
    case "call.candidate": onCandidate(msg); break;
    case "call.accepted":
      if (state.call && String(state.call.id) === msg.call_id) {
        if (state.call.role === "callee" && msg.device_id !== state.deviceId) {
          log("answered on another device"); teardown("answered elsewhere");
        } else if (state.call.role === "caller") {
          setCallState("connecting…");
        }
      }
      break;
    case "call.end":
      log(`call ${msg.call_id || ""} ended: ${msg.reason}${msg.duration_seconds ? ` after ${msg.duration_seconds}s` : ""}`);
      if (!state.call || msg.call_id === null || String(state.call.id) === msg.call_id) {
        state.lastEnd = msg;
        teardown(msg.reason);
      }
      break;
    case "error": {
      // Candidates still in flight when the other side ended the call are refused as
      // wrong_state: expected, not a fault of this page.
      const late = msg.code === "wrong_state" && msg.ref_type === "call.candidate"
        && (!state.call || String(state.call.id) !== msg.call_id);
      log(`error ${msg.code}: ${msg.detail}`, !late);
      break;
    }
  }
}

function setCallState(text) { $("call-state").textContent = text; state.callState = text; }

function incoming(p) {
  if (state.call) return;
  state.call = { id: p.object_id, type: p.verb.includes("video") ? "video" : "voice", role: "callee",
    peer: p.actor.id, pendingCandidates: [], offer: null, pc: null };
  $("incoming-from").textContent = p.actor.username || p.actor.id;
  $("incoming-type").textContent = state.call.type;
  show("incoming", true);
  log(`incoming ${state.call.type} call from ${p.actor.username}`);
}

function newPeerConnection() {
  const pc = new RTCPeerConnection({ iceServers: [] });
  pc.onicecandidate = (e) => {
    if (e.candidate) publish({ type: "call.candidate", call_id: String(state.call.id), candidate: e.candidate.toJSON() });
  };
  pc.ontrack = (e) => { $("remote-video").srcObject = e.streams[0]; };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "connected") setCallState("connected");
    if (pc.connectionState === "failed") setCallState("connection failed");
  };
  return pc;
}

async function addMedia(pc, type) {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: type === "video" });
  $("local-video").srcObject = stream;
  stream.getTracks().forEach((t) => pc.addTrack(t, stream));
}

async function placeCall(type) {
  const callee = $("callee").value.trim();
  if (!callee || state.call) return;
  const call = await api("POST", "/api/calls/initiate/", { receiver_id: callee, call_type: type, conversation_id: state.conversation });
  state.call = { id: call.id, type, role: "caller", peer: callee, pendingCandidates: [], pc: null };
  showCall(`Calling ${callee}…`);
  setCallState("ringing");
  const pc = newPeerConnection();
  state.call.pc = pc;
  await addMedia(pc, type);
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  publish({ type: "call.offer", call_id: String(call.id), offer: { type: offer.type, sdp: offer.sdp } });
}

function showCall(title) {
  $("call-title").textContent = title;
  show("dialer", false); show("incoming", false); show("in-call", true);
}

function onOffer(msg) {
  if (!state.call || String(state.call.id) !== msg.call_id) return;
  if (state.call.pc && state.call.answered) {
    // Renegotiation during the call.
    renegotiate(msg.offer);
  } else {
    state.call.offer = msg.offer;
  }
}

async function renegotiate(offer) {
  const pc = state.call.pc;
  await pc.setRemoteDescription(offer);
  const answer = await pc.createAnswer();
  await pc.setLocalDescription(answer);
  publish({ type: "call.answer", call_id: String(state.call.id), answer: { type: answer.type, sdp: answer.sdp } });
}

async function accept() {
  const call = state.call;
  if (!call) return;
  await api("POST", `/api/calls/${call.id}/accept/`, { device_id: state.deviceId });
  showCall(`In call with ${call.peer}`);
  setCallState("connecting…");
  // The offer normally arrives right after the ring; wait for it if it has not yet.
  for (let i = 0; !call.offer && i < 100 && state.call === call; i++) await new Promise((r) => setTimeout(r, 50));
  if (!call.offer) { log("no offer received", true); return; }
  const pc = newPeerConnection();
  call.pc = pc;
  await pc.setRemoteDescription(call.offer);
  await addMedia(pc, call.type);
  const answer = await pc.createAnswer();
  await pc.setLocalDescription(answer);
  call.answered = true;
  publish({ type: "call.answer", call_id: String(call.id), answer: { type: answer.type, sdp: answer.sdp } });
  flushCandidates();
}

async function onAnswer(msg) {
  const call = state.call;
  if (!call || String(call.id) !== msg.call_id || !call.pc) return;
  await call.pc.setRemoteDescription(msg.answer);
  call.answered = true;
  flushCandidates();
}

function onCandidate(msg) {
  const call = state.call;
  if (!call || String(call.id) !== msg.call_id) return;
  call.pendingCandidates.push(msg.candidate);
  flushCandidates();
}

function flushCandidates() {
  const call = state.call;
  if (!call || !call.pc || !call.pc.remoteDescription) return;
  for (const c of call.pendingCandidates.splice(0)) {
    call.pc.addIceCandidate(c).catch((e) => log(`ICE candidate: ${e.message}`, true));
  }
}

async function reject() {
  if (!state.call) return;
  await api("POST", `/api/calls/${state.call.id}/reject/`, {});
}

async function hangUp() {
  if (!state.call) return;
  await api("POST", `/api/calls/${state.call.id}/end/`, { reason: "user_hangup" });
}

function teardown(reason) {
  const call = state.call;
  if (call && call.pc) call.pc.close();
  for (const v of ["local-video", "remote-video"]) {
    const s = $(v).srcObject;
    if (s) s.getTracks().forEach((t) => t.stop());
    $(v).srcObject = null;
  }
  state.call = null;
  state.callState = `ended: ${reason}`;
  show("incoming", false); show("in-call", false); show("dialer", true);
  refreshHistory();
}

async function refreshHistory() {
  const data = await api("GET", "/api/calls/?limit=10").catch(() => null);
  if (!data) return;
  const ul = $("history");
  ul.innerHTML = "";
  for (const c of data.results) {
    const li = document.createElement("li");
    const other = c.caller.id === state.me ? `to ${c.receiver.username}` : `from ${c.caller.username}`;
    li.textContent = `#${c.id} ${c.call_type} ${other}: ${c.status}${c.duration_seconds ? ` (${c.duration_seconds}s)` : ""}`;
    ul.append(li);
  }
}

$("signin-btn").onclick = () => signIn().catch(() => {});
$("call-voice").onclick = () => placeCall("voice").catch((e) => log(e.message, true));
$("call-video").onclick = () => placeCall("video").catch((e) => log(e.message, true));
$("accept-btn").onclick = () => accept().catch((e) => log(e.message, true));
$("reject-btn").onclick = () => reject().catch(() => {});
$("end-btn").onclick = () => hangUp().catch(() => {});
$("refresh-history").onclick = () => refreshHistory();
