// Benchmark scenario runner: real Yjs documents synced through real providers against one server.
//
//   node benchmarks/driver.mjs <scenario> '<json options>'
//
// Common options: url (ws://127.0.0.1:PORT), client ("yws" = y-websocket WebsocketProvider,
// "hocus" = @hocuspocus/provider), room (name or prefix), timeoutMs (hard limit for every wait).
// Scenarios: fanout, latency, presence, rooms, flood, build, sync, memory (see README.md for what each measures).
// Output: JSON lines on stdout: {"event": "result", ...} at the end, {"event": "built"} for build
// (then the driver waits for a line on stdin before it disconnects). Progress goes to stderr.
// Packages resolve from benchmarks/node_modules (benchmarks/package.json, installed by `make bench`).
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import { readFileSync, readdirSync } from 'node:fs'
import { performance } from 'node:perf_hooks'
import { createInterface } from 'node:readline'
import { spawn } from 'node:child_process'
import { setPriority } from 'node:os'
import { fileURLToPath } from 'node:url'

const now = () => performance.now()
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))
const log = (...args) => console.error('[driver]', ...args)
const emit = obj => process.stdout.write(JSON.stringify(obj) + '\n')

let HocuspocusProvider = null
async function loadHocuspocus () {
  if (HocuspocusProvider === null) {
    ({ HocuspocusProvider } = await import('@hocuspocus/provider'))
  }
  return HocuspocusProvider
}

/** Wait until predicate() is true, polling every `every` ms; throws after timeoutMs. */
async function waitFor (predicate, timeoutMs, what, every = 2) {
  const deadline = now() + timeoutMs
  while (!predicate()) {
    if (now() > deadline) throw new Error(`timeout after ${timeoutMs} ms waiting for ${what}`)
    await sleep(every)
  }
}

/**
 * One client: a Y.Doc synced through a provider. `synced` resolves when the server's SyncStep2
 * has been applied (y-websocket 'sync' true / hocuspocus 'synced').
 */
async function makeClient (opts, room) {
  const doc = new Y.Doc()
  let provider
  const synced = new Promise(resolve => {
    if (opts.client === 'hocus') {
      provider = new HocuspocusProvider({
        url: opts.url,
        name: room,
        document: doc,
        WebSocketPolyfill: WebSocket,
        onSynced: () => resolve()
      })
    } else {
      provider = new WebsocketProvider(opts.url, room, doc, {
        WebSocketPolyfill: WebSocket,
        disableBc: true // same-process clients must talk through the server, not a BroadcastChannel
      })
      if (provider.synced) resolve()
      provider.on('sync', s => { if (s) resolve() })
    }
  })
  return {
    doc,
    provider,
    synced,
    destroy () {
      try { provider.destroy() } catch (e) { log('destroy failed', e?.message) }
      doc.destroy()
    }
  }
}

async function syncAll (clients, timeoutMs) {
  let timer
  const timeout = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout after ${timeoutMs} ms waiting for sync`)), timeoutMs)
  })
  try {
    await Promise.race([Promise.all(clients.map(c => c.synced)), timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** Count, percentiles, max and mean of delays in ms (sorts `samples`). */
function delays (samples) {
  samples.sort((a, b) => a - b)
  return {
    samples: samples.length,
    p50_ms: percentile(samples, 50),
    p90_ms: percentile(samples, 90),
    p99_ms: percentile(samples, 99),
    max_ms: samples.length ? samples[samples.length - 1] : null,
    mean_ms: samples.length ? samples.reduce((a, b) => a + b, 0) / samples.length : null
  }
}

/** Wait (30 s at most) until done(), then close every client; returns the timeout's message or null. */
async function finish (clients, done, what, timeoutMs) {
  let error = null
  try {
    await waitFor(done, Math.min(timeoutMs, 30000), what)
  } catch (e) { error = e.message }
  clients.forEach(c => c.destroy())
  return error
}

function percentile (sorted, p) {
  if (sorted.length === 0) return null
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil(p / 100 * sorted.length) - 1))
  return sorted[idx]
}

// ---- RSS of a process tree, from /proc (Linux) ----
function childrenOf (pid) {
  const out = []
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      const txt = readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim()
      if (txt) out.push(...txt.split(/\s+/).map(Number))
    }
  } catch { /* process gone */ }
  return out
}
function rssKb (pid) {
  let total = 0
  const stack = [pid]
  const seen = new Set()
  while (stack.length) {
    const p = stack.pop()
    if (seen.has(p)) continue
    seen.add(p)
    try {
      const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${p}/status`, 'utf8'))
      if (m) total += Number(m[1])
    } catch { /* gone */ }
    stack.push(...childrenOf(p))
  }
  return total
}

// ---- scenarios ----

/** 1 writer → N readers in one room; `updates` small updates sent back to back. */
async function fanout (opts) {
  const room = opts.room
  const writer = await makeClient(opts, room)
  const readers = []
  for (let i = 0; i < opts.readers; i++) readers.push(await makeClient(opts, room))
  const all = [writer, ...readers]
  await syncAll(all, opts.timeoutMs)
  const n = opts.updates
  const doneAt = new Array(readers.length).fill(null)
  let t0 = 0
  readers.forEach((r, i) => {
    const arr = r.doc.getArray('a')
    arr.observe(() => { if (doneAt[i] === null && arr.length >= n) doneAt[i] = now() })
  })
  const warr = writer.doc.getArray('a')
  t0 = now()
  for (let i = 0; i < n; i++) warr.push([i]) // one transaction = one update message each
  const sentMs = now() - t0
  let error = null
  try {
    await waitFor(() => doneAt.every(t => t !== null), opts.timeoutMs, 'all readers to receive all updates')
  } catch (e) { error = e.message }
  const finished = doneAt.filter(t => t !== null).map(t => t - t0).sort((a, b) => a - b)
  const elapsed = finished.length === readers.length ? finished[finished.length - 1] : null
  const received = readers.map(r => r.doc.getArray('a').length)
  all.forEach(c => c.destroy())
  return {
    readers: readers.length,
    updates: n,
    send_ms: sentMs,
    elapsed_ms: elapsed,
    first_reader_done_ms: finished[0] ?? null,
    median_reader_done_ms: percentile(finished, 50),
    deliveries_per_s: elapsed ? readers.length * n / (elapsed / 1000) : null,
    delivered: received.reduce((a, b) => a + b, 0),
    expected: readers.length * n,
    error
  }
}

/** N readers, writer sends `rate` updates/s for `seconds`; each update carries its send time. */
async function latency (opts) {
  const room = opts.room
  const writer = await makeClient(opts, room)
  const readers = []
  for (let i = 0; i < opts.readers; i++) readers.push(await makeClient(opts, room))
  const all = [writer, ...readers]
  await syncAll(all, opts.timeoutMs)
  const total = Math.round(opts.rate * opts.seconds)
  const warmup = Math.min(opts.warmup ?? 20, Math.floor(total / 10))
  const samples = []
  let received = 0
  readers.forEach(r => {
    r.doc.getArray('l').observe(ev => {
      const t = now()
      for (const d of ev.changes.delta) {
        if (!d.insert) continue
        for (const v of d.insert) {
          received++
          if (v.i >= warmup) samples.push(t - v.t)
        }
      }
    })
  })
  const warr = writer.doc.getArray('l')
  const interval = 1000 / opts.rate
  const start = now()
  let maxLag = 0
  for (let i = 0; i < total; i++) {
    const due = start + i * interval
    const wait = due - now()
    if (wait > 0) await sleep(wait)
    maxLag = Math.max(maxLag, now() - due)
    warr.push([{ t: now(), i }])
  }
  const expected = total * readers.length
  const error = await finish(all, () => received >= expected, 'all latency samples', opts.timeoutMs)
  return {
    readers: readers.length,
    rate: opts.rate,
    seconds: opts.seconds,
    sent: total,
    received,
    expected,
    ...delays(samples),
    writer_max_schedule_lag_ms: maxLag,
    error
  }
}

/**
 * N clients in one room move their cursors: each sets an awareness field {t, i} `rate` times a second
 * for `seconds` (clients staggered evenly), so every client receives the other N − 1 clients' moves.
 * Awareness is not persisted by any server, so this measures relaying alone: latency per delivered move.
 * A server may merge moves that wait (awareness keeps only each client's newest state), so the run ends
 * when every client holds every other client's last move; `received` counts the moves delivered.
 */
async function presence (opts) {
  const room = opts.room
  const clients = []
  for (let i = 0; i < opts.clients; i++) clients.push(await makeClient(opts, room))
  await syncAll(clients, opts.timeoutMs)
  const total = Math.round(opts.rate * opts.seconds)
  const warmup = Math.min(opts.warmup ?? 10, Math.floor(total / 10))
  const samples = []
  let received = 0
  let finished = 0 // (receiver, sender) pairs where the receiver holds the sender's last move
  clients.forEach(c => {
    const awareness = c.provider.awareness
    const own = awareness.clientID
    awareness.on('change', ({ added, updated }) => {
      const t = now()
      for (const id of added.concat(updated)) {
        if (id === own) continue
        const cursor = awareness.getStates().get(id)?.cursor
        if (!cursor) continue
        received++
        if (cursor.i >= warmup) samples.push(t - cursor.t)
        if (cursor.i === total - 1) finished++
      }
    })
  })
  const interval = 1000 / opts.rate
  const start = now()
  let maxLag = 0
  const movers = clients.map(async (c, k) => {
    const offset = interval * k / clients.length
    for (let i = 0; i < total; i++) {
      const due = start + offset + i * interval
      const wait = due - now()
      if (wait > 0) await sleep(wait)
      maxLag = Math.max(maxLag, now() - due)
      c.provider.awareness.setLocalStateField('cursor', { t: now(), i })
    }
  })
  await Promise.all(movers)
  const pairs = clients.length * (clients.length - 1)
  const error = await finish(clients, () => finished >= pairs, 'every last cursor move', opts.timeoutMs)
  return {
    clients: clients.length,
    rate: opts.rate,
    seconds: opts.seconds,
    received,
    sent: total * pairs,
    ...delays(samples),
    mover_max_schedule_lag_ms: maxLag,
    error
  }
}

/** R rooms × 2 clients: time to connect+sync all, then each room's first client sends U updates. */
async function rooms (opts) {
  const R = opts.rooms
  const U = opts.updatesPerRoom
  const t0 = now()
  const pairs = []
  for (let i = 0; i < R; i++) {
    const room = `${opts.room}-${i}`
    pairs.push([await makeClient(opts, room), await makeClient(opts, room)])
  }
  const all = pairs.flat()
  let error = null
  try {
    await syncAll(all, opts.timeoutMs)
  } catch (e) { error = e.message }
  const connectMs = now() - t0
  const syncedCount = (await Promise.all(all.map(c => Promise.race([c.synced.then(() => 1), sleep(0).then(() => 0)])))).reduce((a, b) => a + b, 0)
  let elapsed = null
  let delivered = 0
  if (!error) {
    const t1 = now()
    for (const [a] of pairs) {
      const arr = a.doc.getArray('r')
      for (let j = 0; j < U; j++) arr.push([j])
    }
    const sendMs = now() - t1
    try {
      await waitFor(() => pairs.every(([, b]) => b.doc.getArray('r').length >= U), opts.timeoutMs, 'all rooms to deliver')
      elapsed = now() - t1
    } catch (e) { error = e.message }
    delivered = pairs.reduce((s, [, b]) => s + b.doc.getArray('r').length, 0)
    opts._sendMs = sendMs
  }
  all.forEach(c => c.destroy())
  return {
    rooms: R,
    clients: all.length,
    synced_clients: syncedCount,
    connect_sync_ms: connectMs,
    updates_per_room: U,
    send_ms: opts._sendMs ?? null,
    elapsed_ms: elapsed,
    updates_per_s: elapsed ? R * U / (elapsed / 1000) : null,
    delivered,
    expected: R * U,
    error
  }
}


/**
 * One room's latency while other clients flood rooms of their own: `flooders` clients (in a child process at the
 * lowest CPU priority, so they take no CPU from the server or the probe they do not need) push one-item updates as
 * fast as their sockets take them for `seconds`; meanwhile a writer in another room pushes {t, i} every
 * `interval` ms and a reader there measures receive − send time. The run ends when the reader holds them all.
 */
async function flood (opts) {
  const probeRoom = `${opts.room}-probe`
  const writer = await makeClient(opts, probeRoom)
  const reader = await makeClient(opts, probeRoom)
  await syncAll([writer, reader], opts.timeoutMs)
  const samples = []
  reader.doc.getArray('l').observe(ev => {
    const t = now()
    for (const d of ev.changes.delta) for (const v of d.insert ?? []) samples.push(t - v.t)
  })
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), 'flooders', JSON.stringify(opts)],
    { stdio: ['ignore', 'pipe', 'inherit'] })
  setPriority(child.pid, 19)
  let floodOut = ''
  child.stdout.on('data', chunk => { floodOut += chunk })
  const flooding = new Promise(resolve => child.on('exit', resolve))
  await waitFor(() => floodOut.includes('"flooding"'), opts.timeoutMs, 'the flooders to start')
  const warr = writer.doc.getArray('l')
  const start = now()
  let sent = 0
  while (now() - start < opts.seconds * 1000) {
    warr.push([{ t: now(), i: sent++ }])
    await sleep(opts.interval)
  }
  await flooding
  const flooded = JSON.parse(floodOut.trim().split('\n').pop())
  const error = await finish([writer, reader], () => samples.length >= sent, 'every probe update', opts.timeoutMs)
  return { flooders: opts.flooders, seconds: opts.seconds, sent, received: samples.length, ...delays(samples),
    flood_updates: flooded.updates, error }
}

/**
 * The flood scenario's child: its flooders, one room each, until `seconds` are up; prints how many they sent.
 * With `cut`, each appends an emoji and inserts a character between its two UTF-16 units, ten at a time.
 */
async function flooders (opts) {
  const clients = []
  for (let k = 0; k < opts.flooders; k++) clients.push(await makeClient(opts, `${opts.room}-flood-${k}`))
  await syncAll(clients, opts.timeoutMs)
  emit({ event: 'flooding' })
  const ends = now() + opts.seconds * 1000
  let updates = 0
  await Promise.all(clients.map(async c => {
    const arr = c.doc.getArray('f')
    const text = c.doc.getText('t')
    while (now() < ends) {
      if (opts.cut) {
        for (let j = 0; j < 10; j++) { text.insert(text.length, '😀'); text.insert(text.length - 1, 'x'); updates += 2 }
      } else for (let j = 0; j < 100; j++) arr.push([updates++])
      const ws = c.provider.ws
      while (ws && ws.bufferedAmount > 1 << 20 && now() < ends) await sleep(1) // as fast as the socket takes them
      await sleep(0)
    }
  }))
  clients.forEach(c => c.destroy())
  emit({ updates })
  process.exit(0)
}
/**
 * Build a document of `updates` small updates through the server. The writer sends in chunks and
 * waits until a second client has received each chunk (so no server has to queue 100,000 messages),
 * then reports {"event": "built"} and keeps both connections open until a line arrives on stdin.
 */
async function build (opts) {
  const room = opts.room
  const writer = await makeClient(opts, room)
  const watcher = await makeClient(opts, room)
  await syncAll([writer, watcher], opts.timeoutMs)
  const warr = writer.doc.getArray('c')
  const seen = watcher.doc.getArray('c')
  const chunk = opts.chunk ?? 1000
  const t0 = now()
  let error = null
  try {
    for (let sent = 0; sent < opts.updates;) {
      const upto = Math.min(opts.updates, sent + chunk)
      for (; sent < upto; sent++) warr.push([sent % 1000]) // 1 small item per update
      await waitFor(() => seen.length >= upto, opts.timeoutMs, `watcher to see ${upto} items`)
    }
  } catch (e) { error = e.message }
  const buildMs = now() - t0
  const stateBytes = Y.encodeStateAsUpdate(writer.doc).length
  emit({ event: 'built', updates: opts.updates, build_ms: buildMs, watcher_items: seen.length, error })
  if (!opts.noHold) {
    // hold the connections until the orchestrator says the server has persisted everything
    const rl = createInterface({ input: process.stdin })
    await Promise.race([new Promise(resolve => rl.once('line', resolve)), new Promise(resolve => rl.once('close', resolve)), sleep(opts.holdMaxMs ?? 600000)])
    rl.close()
  }
  writer.destroy()
  watcher.destroy()
  await sleep(opts.afterCloseMs ?? 300) // let the close frames go out
  return { updates: opts.updates, build_ms: buildMs, builds_per_s: opts.updates / (buildMs / 1000), state_bytes: stateBytes, watcher_items: seen.length, error }
}

/** A fresh client syncs the room: time from provider creation to synced; then a second one (warm). */
async function sync (opts) {
  // Pay the server's first-connection costs (lazy imports, JIT, store handles) on another room, so that
  // cold_sync_ms measures loading *this* document, not starting the process.
  let prewarmMs = null
  if (opts.prewarm !== false) {
    const tp = now()
    const pre = await makeClient(opts, `${opts.room}--prewarm`)
    try { await syncAll([pre], opts.timeoutMs); prewarmMs = now() - tp } catch (e) { log('prewarm failed', e.message) }
    pre.destroy()
    await sleep(100)
  }
  const t0 = now()
  const first = await makeClient(opts, opts.room)
  let error = null
  try { await syncAll([first], opts.timeoutMs) } catch (e) { error = e.message }
  const coldMs = error ? null : now() - t0
  // hocuspocus answers SyncStep1 after loading; give a late update a moment if the count is short
  const items = () => first.doc.getArray('c').length
  if (!error && opts.expected && items() < opts.expected) {
    try { await waitFor(() => items() >= opts.expected, 2000, 'expected items') } catch {}
  }
  const coldItems = items()
  const coldFullMs = coldItems >= (opts.expected ?? 0) ? now() - t0 : null
  let warmMs = null
  let warmItems = null
  if (!error) {
    const t1 = now()
    const second = await makeClient(opts, opts.room)
    try {
      await syncAll([second], opts.timeoutMs)
      warmMs = now() - t1
      warmItems = second.doc.getArray('c').length
    } catch (e) { error = e.message }
    second.destroy()
  }
  first.destroy()
  await sleep(100)
  return { prewarm_sync_ms: prewarmMs, cold_sync_ms: coldMs, cold_full_ms: coldFullMs, items: coldItems, expected: opts.expected ?? null, warm_sync_ms: warmMs, warm_items: warmItems, error }
}

/** RSS of the server process tree: baseline, after R idle loaded rooms (1 client each), after C more connections. */
async function memory (opts) {
  const pid = opts.pid
  const settle = opts.settleMs ?? 1500
  // warm up lazy imports / first-room costs so they do not count as per-room memory
  const w = await makeClient(opts, `${opts.room}-warmup`)
  await syncAll([w], opts.timeoutMs)
  w.doc.getArray('m').push(['warm'])
  await sleep(200)
  w.destroy()
  await sleep(settle)
  const rss0 = rssKb(pid)
  const roomClients = []
  for (let i = 0; i < opts.rooms; i++) roomClients.push(await makeClient(opts, `${opts.room}-${i}`))
  await syncAll(roomClients, opts.timeoutMs)
  roomClients.forEach((c, i) => {
    const arr = c.doc.getArray('m')
    for (let j = 0; j < (opts.updatesPerRoom ?? 10); j++) arr.push([`room ${i} item ${j}`])
  })
  await sleep(settle)
  const rss1 = rssKb(pid)
  const extra = []
  for (let i = 0; i < opts.extraConns; i++) extra.push(await makeClient(opts, `${opts.room}-${i % opts.rooms}`))
  await syncAll(extra, opts.timeoutMs)
  await sleep(settle)
  const rss2 = rssKb(pid)
  const all = [...roomClients, ...extra]
  all.forEach(c => c.destroy())
  await sleep(300)
  return {
    rooms: opts.rooms,
    extra_conns: opts.extraConns,
    rss_baseline_kb: rss0,
    rss_rooms_kb: rss1,
    rss_conns_kb: rss2,
    kb_per_room: (rss1 - rss0) / opts.rooms,
    kb_per_conn: (rss2 - rss1) / opts.extraConns,
    error: null
  }
}

const SCENARIOS = { fanout, latency, presence, rooms, flood, flooders, build, sync, memory }

async function main () {
  const [name, json] = process.argv.slice(2)
  const fn = SCENARIOS[name]
  if (!fn) {
    console.error(`usage: node driver.mjs <${Object.keys(SCENARIOS).join('|')}> '<json options>'`)
    process.exit(2)
  }
  const opts = { client: 'yws', timeoutMs: 60000, ...JSON.parse(json || '{}') }
  if (opts.client === 'hocus') await loadHocuspocus()
  // hard stop: a scenario must never outlive its budget
  const hard = setTimeout(() => { emit({ event: 'result', scenario: name, error: 'driver hard timeout' }); process.exit(3) }, (opts.hardTimeoutMs ?? opts.timeoutMs * 3))
  hard.unref()
  let result
  try {
    result = await fn(opts)
  } catch (e) {
    result = { error: e?.stack || String(e) }
  }
  emit({ event: 'result', scenario: name, ...result })
  process.exit(0)
}

main()
