// The filter's own share of a request's cost, without Envoy: runs a .wasm under a
// stand-in proxy-wasm host in Node's V8, drives it through the requests of
// lab/bench's apikey-hot configuration (100 keys, all cached after the first round),
// and reports for a cached request
//
//   - each host call it makes, by name: the ones that hand data back are marked, as on
//     Envoy each of those also calls into the VM to allocate (~1.6-2.3 µs all in, against
//     ~0.2 µs for another call; see docs/performance.md);
//   - the time its wasm code runs, from V8's sampling profiler, in all and by function
//     (named when the build kept its names: lab/wasm-cost makes such a build).
//
// The counts are exact: those of the median of 100 requests, one per key, the same on every
// run. The time leaves the stand-in host out
// and varies by a few percent from run to run; it is Node's V8, not Envoy's, so compare
// builds with each other here, and see lab/bench for what a user gets.
//
// With --cold, the same for requests whose key is new each time: a cache miss, a callout
// (answered at once by the stand-in with a found record) and the request resumed.
//
//   node lab/wasm-cost.mjs FILE.wasm [--requests N] [--cold] [--config JSON]
import fs from "node:fs";
import { Session } from "node:inspector";
import { randomFillSync } from "node:crypto";

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const at = args.indexOf(name);
  return at >= 0 ? args[at + 1] : fallback;
};
const wasmPath = args[0];
if (!wasmPath || wasmPath.startsWith("--")) {
  console.error("usage: node lab/wasm-cost.mjs FILE.wasm [--requests N] [--cold] [--config JSON]");
  process.exit(2);
}
const REQUESTS = Number(option("--requests", "300000"));
const HOT_KEYS = 100;
// lab/bench's apikey-hot: a rate limit that never runs dry.
const PLUGIN_CONFIG = option("--config",
  JSON.stringify({ key_service: { cluster: "key_service", timeout_ms: 500 },
                   rate_limit: { requests: 1000000000, period_s: 1 } }));
const KEY_RECORD = JSON.stringify({ key_id: "k_1", owner: "acme", scopes: ["orders:read"] });

const OK = 0, NOT_FOUND = 1, EMPTY = 7, CAS_MISMATCH = 8, UNIMPLEMENTED = 12;
const REQUEST_HEADERS = 0, RESPONSE_HEADERS = 2, CALLOUT_RESPONSE_HEADERS = 6;
const CALLOUT_RESPONSE_BODY = 4, PLUGIN_CONFIGURATION = 7;
// Host calls that hand data back: on Envoy, each calls into the VM's allocator first.
const RETURNS_DATA = new Set(["proxy_get_header_map_pairs", "proxy_get_header_map_value",
  "proxy_get_shared_data", "proxy_get_buffer_bytes", "proxy_get_property",
  "proxy_dequeue_shared_queue"]);

let exports, current = 0;
// Views of the VM's memory, made again only when it grows (which detaches the old ones).
let memory = { buffer: null, bytes: null, view: null };
function mem() {
  if (memory.buffer !== exports.memory.buffer) {
    const buffer = exports.memory.buffer;
    memory = { buffer, bytes: Buffer.from(buffer), view: new DataView(buffer) };
  }
  return memory;
}
const bytes = (ptr, len) => Buffer.from(mem().bytes.subarray(ptr, ptr + len));
const text = (ptr, len) => mem().bytes.latin1Slice(ptr, ptr + len);
const view = () => mem().view;
function giveBack(data, ptrAt, sizeAt) {
  const ptr = exports.proxy_on_memory_allocate(data.length);
  mem().bytes.set(data, ptr);
  view().setUint32(ptrAt, ptr, true);
  view().setUint32(sizeAt, data.length, true);
  return OK;
}

// Header maps as proxy-wasm serializes them: count, (name size, value size) pairs, then
// each name and value followed by a NUL.
function serialize(pairs) {
  const parts = pairs.map(([n, v]) => [Buffer.from(n, "latin1"), Buffer.from(v, "latin1")]);
  const head = Buffer.alloc(4 + 8 * parts.length);
  head.writeUInt32LE(parts.length, 0);
  parts.forEach(([n, v], i) => { head.writeUInt32LE(n.length, 4 + 8 * i); head.writeUInt32LE(v.length, 8 + 8 * i); });
  return Buffer.concat([head, ...parts.flatMap(([n, v]) => [n, Buffer.of(0), v, Buffer.of(0)])]);
}

const maps = new Map();        // context id -> map type -> [[name, value]]
const serializedRequest = new Map();  // context id -> its request headers, as first given
const shared = new Map();      // key -> {value, cas}
let nextCas = 1;
const queues = [];             // token -> {owner, items}
const readyQueues = [];
const callouts = [];           // {context, token}
let nextToken = 1;
let calloutResponse = { headers: [], body: Buffer.alloc(0) };
const answered = new Map();    // context id -> status of its local reply
const continued = new Set();
let counts = new Map();
let counting = false;

/** The header map `type` of the current context (or of the callout's answer). */
function mapOf(type) {
  if (type === CALLOUT_RESPONSE_HEADERS) return calloutResponse.headers;
  const ofContext = maps.get(current) ?? maps.set(current, new Map()).get(current);
  return ofContext.get(type) ?? ofContext.set(type, []).get(type);
}

/** The map `type`, about to change: the request's headers as first serialized no longer hold. */
function changing(type) {
  if (type === REQUEST_HEADERS) serializedRequest.delete(current);
  return mapOf(type);
}

function removeAll(map, name) {
  const kept = map.filter(([n]) => n !== name);
  map.length = 0;
  map.push(...kept);
}

const host = {
  proxy_log: (level, ptr, len) => { if (level >= 3) console.error(`filter log: ${text(ptr, len)}`); return OK; },
  proxy_get_log_level: (at) => { view().setUint32(at, 2, true); return OK; },
  proxy_get_current_time_nanoseconds: (at) => {
    view().setBigUint64(at, BigInt(Date.now()) * 1000000n, true); return OK;
  },
  proxy_set_tick_period_milliseconds: () => OK,
  proxy_get_status: (codeAt, ptrAt, sizeAt) => {
    view().setUint32(codeAt, 200, true); return giveBack(Buffer.alloc(0), ptrAt, sizeAt);
  },
  proxy_get_buffer_bytes: (type, start, max, ptrAt, sizeAt) => {
    const data = type === PLUGIN_CONFIGURATION ? Buffer.from(PLUGIN_CONFIG)
      : type === CALLOUT_RESPONSE_BODY ? calloutResponse.body : null;
    return data ? giveBack(data.subarray(start, start + (max >>> 0)), ptrAt, sizeAt) : NOT_FOUND;
  },
  proxy_set_buffer_bytes: () => OK,
  proxy_get_header_map_pairs: (type, ptrAt, sizeAt) =>
    giveBack(type === REQUEST_HEADERS && serializedRequest.get(current)
             || serialize(mapOf(type)), ptrAt, sizeAt),
  proxy_set_header_map_pairs: () => UNIMPLEMENTED,
  proxy_get_header_map_value: (type, np, nl, ptrAt, sizeAt) => {
    const found = mapOf(type).find(([n]) => n === text(np, nl));
    return found ? giveBack(Buffer.from(found[1], "latin1"), ptrAt, sizeAt) : NOT_FOUND;
  },
  proxy_add_header_map_value: (type, np, nl, vp, vl) => {
    changing(type).push([text(np, nl), text(vp, vl)]); return OK;
  },
  proxy_replace_header_map_value: (type, np, nl, vp, vl) => {
    const map = changing(type), name = text(np, nl);
    removeAll(map, name);
    map.push([name, text(vp, vl)]);
    return OK;
  },
  proxy_remove_header_map_value: (type, np, nl) => { removeAll(changing(type), text(np, nl)); return OK; },
  proxy_get_property: () => NOT_FOUND,
  proxy_set_property: () => OK,
  proxy_get_shared_data: (kp, kl, ptrAt, sizeAt, casAt) => {
    const entry = shared.get(text(kp, kl));
    if (!entry) return NOT_FOUND;
    view().setUint32(casAt, entry.cas, true);
    return giveBack(entry.value, ptrAt, sizeAt);
  },
  proxy_set_shared_data: (kp, kl, vp, vl, cas) => {
    const key = text(kp, kl), entry = shared.get(key);
    if (entry && cas !== 0 && cas !== entry.cas) return CAS_MISMATCH;
    shared.set(key, { value: bytes(vp, vl), cas: nextCas++ });
    return OK;
  },
  proxy_register_shared_queue: (np, nl, tokenAt) => {
    queues.push({ owner: current, items: [] });
    view().setUint32(tokenAt, queues.length - 1, true); return OK;
  },
  proxy_resolve_shared_queue: () => NOT_FOUND,
  proxy_enqueue_shared_queue: (token, vp, vl) => {
    queues[token].items.push(bytes(vp, vl)); readyQueues.push(token); return OK;
  },
  proxy_dequeue_shared_queue: (token, ptrAt, sizeAt) => {
    const item = queues[token]?.items.shift();
    return item ? giveBack(item, ptrAt, sizeAt) : EMPTY;
  },
  proxy_http_call: (...a) => {
    const token = nextToken++;
    callouts.push({ context: current, token });
    view().setUint32(a[a.length - 1], token, true); return OK;
  },
  proxy_define_metric: (type, np, nl, idAt) => { view().setUint32(idAt, nextToken++, true); return OK; },
  proxy_increment_metric: () => OK,
  proxy_record_metric: () => OK,
  proxy_send_local_response: (status) => { answered.set(current, status); return OK; },
  proxy_continue_stream: () => { continued.add(current); return OK; },
  proxy_close_stream: () => OK,
  proxy_set_effective_context: (context) => { current = context; return OK; },
  proxy_done: () => OK,
  proxy_call_foreign_function: () => NOT_FOUND,
  proxy_grpc_call: () => UNIMPLEMENTED, proxy_grpc_stream: () => UNIMPLEMENTED,
  proxy_grpc_send: () => UNIMPLEMENTED, proxy_grpc_close: () => UNIMPLEMENTED,
  proxy_grpc_cancel: () => UNIMPLEMENTED,
};
const wasi = {
  random_get: (ptr, len) => { randomFillSync(new Uint8Array(exports.memory.buffer, ptr, len)); return 0; },
  environ_sizes_get: (countAt, sizeAt) => { view().setUint32(countAt, 0, true); view().setUint32(sizeAt, 0, true); return 0; },
  environ_get: () => 0,
  fd_write: (fd, iovs, n, writtenAt) => {
    let total = 0;
    for (let i = 0; i < n; i++) {
      const [ptr, len] = [view().getUint32(iovs + 8 * i, true), view().getUint32(iovs + 8 * i + 4, true)];
      process.stderr.write(bytes(ptr, len)); total += len;
    }
    view().setUint32(writtenAt, total, true); return 0;
  },
  proc_exit: (code) => { throw new Error(`the filter exited with ${code}`); },
};
const counted = (name, fn) => (...a) => {
  if (counting) counts.set(name, (counts.get(name) ?? 0) + 1);
  return fn(...a);
};
const imports = {
  env: Object.fromEntries(Object.entries(host).map(([n, f]) => [n, counted(n, f)])),
  wasi_snapshot_preview1: wasi,
};

/** Calls `callback` as the host would for `context` (when the module exports it: a host
 * skips the others), then delivers what it set off. */
function call(context, callback, ...a) {
  current = context;
  const result = exports[callback]?.(context, ...a) ?? 0;
  for (let token; (token = readyQueues.shift()) !== undefined;) {
    call(queues[token].owner, "proxy_on_queue_ready", token);
  }
  for (let c; (c = callouts.shift());) {
    calloutResponse = { headers: [[":status", "200"]], body: Buffer.from(KEY_RECORD) };
    call(c.context, "proxy_on_http_call_response", c.token, 1, calloutResponse.body.length, 0);
  }
  return result;
}

const requestsByKey = new Map();
function requestHeaders(key) {
  if (!requestsByKey.has(key)) {
    const headers = [[":authority", "bench"], [":path", "/v1/orders"], [":method", "GET"],
      [":scheme", "http"], ["user-agent", "wrk"], ["x-api-key", key]];
    headers.serialized = serialize(headers);
    requestsByKey.set(key, headers);
  }
  return requestsByKey.get(key);
}

const ROOT = 1;
let nextContext = 2;
/** One request through every callback Envoy makes; the status the client gets. */
function request(key) {
  const context = nextContext++;
  call(context, "proxy_on_context_create", ROOT);
  const headers = requestHeaders(key);
  maps.set(context, new Map([[REQUEST_HEADERS, [...headers]]]));
  serializedRequest.set(context, headers.serialized);
  const paused = call(context, "proxy_on_request_headers", 6, 1) !== 0;
  let status = answered.get(context);
  if (status === undefined && (!paused || continued.has(context))) {
    maps.get(context).set(RESPONSE_HEADERS, [[":status", "200"], ["content-length", "2"],
      ["content-type", "text/plain"]]);
    call(context, "proxy_on_response_headers", 3, 0);
    call(context, "proxy_on_response_body", 2, 1);
    status = 200;
  }
  call(context, "proxy_on_log");
  call(context, "proxy_on_done");
  call(context, "proxy_on_delete");
  maps.delete(context); answered.delete(context); continued.delete(context);
  serializedRequest.delete(context);
  return status;
}

const module = await WebAssembly.compile(fs.readFileSync(wasmPath));
({ exports } = await WebAssembly.instantiate(module, imports));
exports._initialize?.();
call(ROOT, "proxy_on_context_create", 0);
call(ROOT, "proxy_on_vm_start", 0);
if (!call(ROOT, "proxy_on_configure", PLUGIN_CONFIG.length)) {
  throw new Error("the filter refused its configuration");
}
const keys = Array.from({ length: HOT_KEYS }, (_, i) => `bench-hot-${i}`);
for (let i = 0; i < 20000; i++) {   // the first round fills the cache, the rest warm V8 up
  const status = request(keys[i % HOT_KEYS]);
  if (status !== 200) throw new Error(`a warm-up request got ${status}, not 200`);
}

// --cold: every measured request carries a key never seen before (a miss, a callout the
// stand-in answers at once with a found record, the request resumed).
const COLD = args.includes("--cold");
const kind = COLD ? "cold" : "cached";
let coldKeys = 0;
const measuredKey = (i) => COLD ? `bench-cold-${coldKeys++}` : keys[i % HOT_KEYS];
// One request per hot key, each counted on its own; the median one is reported. A worker
// places its copies of keys by a secret drawn at start, so now and then a key finds no room
// among them and each of its requests reads shared data again: a cost of that key, not of
// a cached request.
counting = true;
const countedRequests = [];
for (let i = 0; i < HOT_KEYS; i++) {
  counts = new Map();
  if (request(measuredKey(i)) !== 200) throw new Error(`a ${kind} request was not answered 200`);
  countedRequests.push(counts);
}
counting = false;
const total = (map) => [...map.values()].reduce((sum, n) => sum + n, 0);
countedRequests.sort((a, b) => total(a) - total(b));
counts = countedRequests[Math.floor(HOT_KEYS / 2)];
// node:inspector's callback API: its promise one (inspector/promises) needs Node 19, and
// Debian 12's nodejs, which scripts/test installs, is Node 18.
const session = new Session();
session.connect();
const post = (method, params = {}) => new Promise((resolve, reject) =>
  session.post(method, params, (error, result) => (error ? reject(error) : resolve(result))));
await post("Profiler.enable");
await post("Profiler.setSamplingInterval", { interval: 50 });
await post("Profiler.start");
const started = process.hrtime.bigint();
for (let i = 0; i < REQUESTS; i++) request(measuredKey(i));
const perRequestNs = Number(process.hrtime.bigint() - started) / REQUESTS;
const { profile } = await post("Profiler.stop");

const calls = [...counts].sort((a, b) => b[1] - a[1]);
const sum = (list) => list.reduce((total, [, n]) => total + n, 0);
console.log(wasmPath);
console.log(`host calls per ${kind} request: ${sum(calls)}, ` +
            `${sum(calls.filter(([n]) => RETURNS_DATA.has(n)))} of them handing data back (*)`);
for (const [name, n] of calls) console.log(`  ${n}  ${name}${RETURNS_DATA.has(name) ? " *" : ""}`);

const byFunction = new Map();
let inWasm = 0;
const nodes = new Map(profile.nodes.map((node) => [node.id, node]));
for (const id of profile.samples) {
  const frame = nodes.get(id).callFrame;
  if (!frame.url.startsWith("wasm://")) continue;
  inWasm += 1;
  const name = demangle(frame.functionName);
  byFunction.set(name, (byFunction.get(name) ?? 0) + 1);
}
const ns = (samples) => (perRequestNs * samples / profile.samples.length).toFixed(0).padStart(5);
console.log(`wasm code per ${kind} request: ${ns(inWasm).trim()} ns ` +
            `(${REQUESTS} requests, Node ${process.version}); by function, top 25:`);
for (const [name, samples] of [...byFunction].sort((a, b) => b[1] - a[1]).slice(0, 25)) {
  console.log(`  ${ns(samples)} ns  ${name}`);
}

/** Rust's legacy symbol mangling, made readable: `_ZN3foo3bar17h…E` is `foo::bar`. */
function demangle(symbol) {
  const parts = [];
  let rest = symbol.startsWith("_ZN") ? symbol.slice(3) : null;
  while (rest && /^\d/.test(rest)) {
    const len = parseInt(rest, 10), digits = String(len).length;
    parts.push(rest.slice(digits, digits + len));
    rest = rest.slice(digits + len);
  }
  if (!parts.length) return symbol;
  if (/^h[0-9a-f]{16}$/.test(parts.at(-1))) parts.pop();
  const escapes = { LT: "<", GT: ">", RF: "&", BP: "*", C: ",", SP: "@", u20: " ", u27: "'",
                    u7b: "{", u7d: "}", u5b: "[", u5d: "]", u3b: ";", u7e: "~" };
  return parts.join("::").replace(/\$([A-Za-z0-9]+)\$/g, (m, e) => escapes[e] ?? m)
    .replace(/\.\./g, "::");
}
