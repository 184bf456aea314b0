// Random text edits by several Yjs replicas at any UTF-16 position, so characters beyond the BMP (emoji) get
// cut between their two units. Prints one JSON line per scenario: the updates in the order a server receives
// them, and the text a Yjs document holds after them. Usage: node cuts.mjs SEED SCENARIOS
import * as Y from 'yjs'

const [seed, scenarios] = process.argv.slice(2).map(Number)
let state = seed >>> 0
const random = () => { // mulberry32: reproducible from the seed
  state = (state + 0x6D2B79F5) >>> 0
  let t = state
  t = Math.imul(t ^ (t >>> 15), t | 1)
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}
const pick = (items) => items[Math.floor(random() * items.length)]
const PIECES = ['a', 'bc', '😀', '👍🏽', 'é', '𝄞x', '中', ' ', '🌍🌍']

for (let s = 0; s < scenarios; s++) {
  const server = new Y.Doc() // what a server receives, in order
  const updates = []
  const replicas = [1, 2, 3].map(() => new Y.Doc())
  const send = (doc) => { // the replica syncs with the server both ways
    const update = Y.encodeStateAsUpdate(doc, Y.encodeStateVector(server))
    if (update.length > 2) {
      updates.push(Buffer.from(update).toString('base64'))
      Y.applyUpdate(server, update)
    }
    Y.applyUpdate(doc, Y.encodeStateAsUpdate(server, Y.encodeStateVector(doc)))
  }
  for (let step = 0; step < 30; step++) {
    const doc = pick(replicas)
    const text = doc.getText('t')
    const at = Math.floor(random() * (text.length + 1))
    const kind = random()
    if (kind < 0.5 || text.length === 0) {
      text.insert(at, pick(PIECES) + pick(PIECES), random() < 0.2 ? { bold: true } : undefined)
    } else if (kind < 0.8) {
      text.delete(at, Math.min(1 + Math.floor(random() * 3), text.length - at))
    } else {
      text.format(at, Math.min(1 + Math.floor(random() * 3), text.length - at), { italic: random() < 0.5 ? true : null })
    }
    if (random() < 0.5) send(doc)
  }
  replicas.forEach(send)
  replicas.forEach(send)
  // Yjs's own replicas can disagree once characters are cut (each replaces the halves it cuts itself), so the
  // reference is a Yjs document that received the updates in the server's order, as y-websocket-server would.
  const agree = new Set(replicas.map((doc) => doc.getText('t').toString())).size === 1
  const text = server.getText('t')
  console.log(JSON.stringify({ updates, delta: text.toDelta(), text: text.toString(), agree }))
}
