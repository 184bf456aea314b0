// Soak: R rooms × P real y-websocket clients editing for S seconds (text inserts and deletes, map and array
// writes, awareness, now and then a disconnect and reconnect or a 50-character burst), plus JSON block edits
// through the HTTP API; then every client must hold exactly the server's document (compared as JSON with sorted
// keys). Prints {"ops", "reconnects", "apiEdits", "diverged": [rooms]}; exits 1 if any room diverged.
//
//   node benchmarks/soak.mjs ws://127.0.0.1:1234 http://127.0.0.1:1234 30 3 60
//
// Several nodes (PostgreSQL + Redis): comma-separated URLs; clients take them in turn, so a room spans nodes.
//
// SOAK_CHURN=1: every room also drops all its clients at once now and then and reconnects them a moment later
// (with a short --idle-unload-seconds the room unloads and loads again meanwhile). SOAK_PAUSE=1: clients also
// stop reading their socket for up to 2 s now and then, so the server queues (and merges) what they miss.
//
// SOAK_EMOJI=1: text inserts are also emoji (two UTF-16 units each, or four), at character boundaries.
// SOAK_EMOJI=cut: at any UTF-16 position, so emoji are cut in two (surrogates.py); Yjs's own replicas can then
// disagree with each other (README, "Where yrs and Yjs differ"), so a diverged room is not necessarily the server's.
//
// Watch the server's RSS (/proc/<pid>/status) and log meanwhile; finding 40 in README.md used it.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
const [urls, https, ROOMS, PER, SECS] = [process.argv[2].split(','), process.argv[3].split(','), +process.argv[4], +process.argv[5], +process.argv[6]]
const canon = v => Array.isArray(v) ? '[' + v.map(canon).join(',') + ']' : (v && typeof v === 'object') ? '{' + Object.keys(v).sort().map(k => JSON.stringify(k) + ':' + canon(v[k])).join(',') + '}' : JSON.stringify(v)
const sleep = ms => new Promise(r => setTimeout(r, ms))
const rnd = n => Math.floor(Math.random() * n)
let nth = 0
function client (room) {
  const doc = new Y.Doc()
  const provider = new WebsocketProvider(urls[nth++ % urls.length], room, doc, { WebSocketPolyfill: WebSocket, disableBc: true, maxBackoffTime: 500 })
  provider.awareness.setLocalState({ user: 'u' + rnd(1000), cursor: 0 })
  return { doc, provider, room }
}
const clients = []
for (let r = 0; r < ROOMS; r++) for (let k = 0; k < PER; k++) clients.push(client(`soak-${r}`))
const end = Date.now() + SECS * 1000
let ops = 0, reconnects = 0, apiEdits = 0, churns = 0, pauses = 0
const CHURN = process.env.SOAK_CHURN === '1'
const PAUSE = process.env.SOAK_PAUSE === '1'
const EMOJI = process.env.SOAK_EMOJI
const PIECES = EMOJI ? ['a', 'b', 'c', '😀', '👍🏽'] : ['a', 'b', 'c']
const isHigh = (code) => code >= 0xD800 && code <= 0xDBFF
// a UTF-16 position in `t`, moved off the middle of a character unless emoji are to be cut
const position = (t, at) => EMOJI !== 'cut' && at > 0 && isHigh(t.toString().charCodeAt(at - 1)) ? at - 1 : at
const width = (t, at) => EMOJI !== 'cut' && isHigh(t.toString().charCodeAt(at)) ? 2 : 1
async function worker (c) {
  while (Date.now() < end) {
    const t = c.doc.getText('t'); const m = c.doc.getMap('m'); const a = c.doc.getArray('a')
    const x = rnd(100)
    if (x < 50) t.insert(position(t, rnd(t.length + 1)), PIECES[rnd(PIECES.length)])
    else if (x < 60 && t.length > 0) { const at = position(t, rnd(t.length)); t.delete(at, width(t, at)) }
    else if (x < 75) m.set('k' + rnd(20), rnd(1000))
    else if (x < 85) a.push([rnd(100)])
    else if (x < 95) c.provider.awareness.setLocalStateField('cursor', rnd(1000))
    else if (x < 96 && PAUSE && c.provider.ws?._socket) {
      const socket = c.provider.ws._socket; socket.pause(); await sleep(rnd(2000)); socket.resume(); pauses++
    } else if (x < 97) { c.provider.disconnect(); await sleep(rnd(300)); c.provider.connect(); reconnects++ }
    else if (x < 98) {
      c.doc.transact(() => { for (let i = 0; i < 50; i++) t.insert(0, 'z') })
    }
    ops++
    await sleep(rnd(40))
  }
}
async function churnWorker (r) {
  const cs = clients.filter(c => c.room === `soak-${r}`)
  while (Date.now() < end) {
    await sleep(500 + rnd(1500))
    cs.forEach(c => c.provider.disconnect())
    await sleep(rnd(600))
    cs.forEach(c => c.provider.connect())
    churns++
  }
}
async function apiWorker () {
  while (Date.now() < end) {
    const room = `soak-${rnd(ROOMS)}`
    const id = 'b' + rnd(5)
    const ops = [{ op: 'create_block', id, type: 'paragraph', content: 'api' },
                 { op: 'add_index', id, index_name: 'ix' + rnd(2) }]
    try {
      const r = await fetch(`${https[rnd(https.length)]}/api/docs/${room}/blocks`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ops }) })
      if (r.status >= 500) console.error('api', r.status, await r.text())
      apiEdits++
    } catch (e) { console.error('api error', e.message) }
    await sleep(50)
  }
}
const churners = CHURN ? [...Array(ROOMS).keys()].map(churnWorker) : []
await Promise.all([...clients.map(worker), apiWorker(), ...churners])
// settle: everyone connected and synced
for (const c of clients) if (!c.provider.wsconnected) c.provider.connect()
// one round: the rooms whose clients differ from the server; `last`: also say where, and dump both documents
async function compare (last) {
  const bad = []
  for (let r = 0; r < ROOMS; r++) {
    const cs = clients.filter(c => c.room === `soak-${r}`)
    let body
    try { // a pooled connection to a node killed meanwhile fails once: the next round asks again
      body = await (await fetch(`${https[r % https.length]}/api/docs/soak-${r}/update`)).arrayBuffer()
    } catch (e) { console.error('api error', e.message); bad.push(`soak-${r}`); continue }
    const sdoc = new Y.Doc(); Y.applyUpdate(sdoc, new Uint8Array(body))
    const want = canon([sdoc.getText('t').toString(), sdoc.getMap('m').toJSON(), sdoc.getArray('a').toJSON(), sdoc.getMap('blocks').toJSON()])
    for (const c of cs) {
      const got = canon([c.doc.getText('t').toString(), c.doc.getMap('m').toJSON(), c.doc.getArray('a').toJSON(), c.doc.getMap('blocks').toJSON()])
      if (got !== want) {
        bad.push(`soak-${r}`)
        if (last) { // say where the first difference is
          const [w, g] = [[...want], [...got]]
          const at = w.findIndex((ch, i) => ch !== g[i])
          const around = (chars) => JSON.stringify(chars.slice(Math.max(0, at - 30), at + 30).join(''))
          console.error(`soak-${r}: client ${c.doc.clientID} differs at ${at} of ${w.length}/${g.length}: server ${around(w)} client ${around(g)}`)
          if (process.env.SOAK_DUMP) { // both documents, to look at their items
            const fs = await import('node:fs')
            fs.writeFileSync(`${process.env.SOAK_DUMP}/soak-${r}-server.bin`, Y.encodeStateAsUpdate(sdoc))
            fs.writeFileSync(`${process.env.SOAK_DUMP}/soak-${r}-client-${c.doc.clientID}.bin`, Y.encodeStateAsUpdate(c.doc))
          }
        }
      }
    }
  }
  return bad
}
const deadline = Date.now() + 30000
let bad = await compare(false)
while (bad.length && Date.now() < deadline) {
  await sleep(500)
  bad = await compare(false)
}
if (bad.length) bad = await compare(true)
console.log(JSON.stringify({ ops, reconnects, apiEdits, churns, pauses, diverged: [...new Set(bad)] }))
clients.forEach(c => c.provider.destroy())
process.exit(bad.length ? 1 : 0)
