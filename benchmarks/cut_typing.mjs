// Clients typing an emoji and cutting it between its two UTF-16 units in their next message, as fast as they can
// (finding 62 in README.md): how far behind their room is when they stop. Prints
// {"ops", "converge_ms": stop -> every client holds the same text, "len", "fresh_match": a fresh client gets it too}.
//
//   node benchmarks/cut_typing.mjs ws://127.0.0.1:1234 3 6 0     # URL, clients, seconds, ms between pairs
//
// Watch collab_rebuilds_total in /metrics meanwhile: each pair split between two batches rebuilds the document.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
const [url, N, SECS, GAP] = [process.argv[2], +process.argv[3], +process.argv[4], +process.argv[5]]
const sleep = ms => new Promise(r => setTimeout(r, ms))
const room = `cut-${Date.now()}`
const cs = []
for (let i = 0; i < N; i++) {
  const doc = new Y.Doc()
  const p = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true })
  cs.push({ doc, p })
}
await Promise.all(cs.map(c => new Promise(r => c.p.on('sync', s => s && r()))))
const end = Date.now() + SECS * 1000
let ops = 0
await Promise.all(cs.map(async c => {
  const t = c.doc.getText('t')
  while (Date.now() < end) {
    t.insert(t.length, '😀')
    t.insert(t.length - 1, 'x')
    ops += 2
    await sleep(GAP)
  }
}))
const stop = Date.now()
const same = () => cs.every(c => c.doc.getText('t').toString() === cs[0].doc.getText('t').toString())
while (!same() && Date.now() - stop < 120000) await sleep(5)
const conv = Date.now() - stop
// fresh client
const d = new Y.Doc(); const p = new WebsocketProvider(url, room, d, { WebSocketPolyfill: WebSocket, disableBc: true })
await new Promise(r => p.on('sync', s => s && r()))
const t0 = Date.now()
while (d.getText('t').toString() !== cs[0].doc.getText('t').toString() && Date.now() - t0 < 30000) await sleep(5)
console.log(JSON.stringify({ ops, converge_ms: conv, len: cs[0].doc.getText('t').length, fresh_match: d.getText('t').toString() === cs[0].doc.getText('t').toString() }))
process.exit(0)
