// Every kind of content Yjs apps write (rich text, ProseMirror-style XML, binary, nested types, subdocuments,
// undo, large pastes, emoji cut in two), sent through y-websocket: the server must accept all of it, relay it
// to a second client and store it so that a client joining later gets the same document.
//   node content.mjs edit URL ROOM FILE    two clients edit; the document is written to FILE
//   node content.mjs check URL ROOM FILE   a new client must get the document in FILE
// Exits 1 with a message when something differs or the server closed a connection.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import * as fs from 'node:fs'

const [phase, url, room, file] = process.argv.slice(2)
const closes = []

const client = (name) => {
  const doc = new Y.Doc()
  const provider = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true })
  provider.on('connection-close', (event) => { if (event) closes.push(`${name}: ${event.code} ${event.reason}`) })
  return { doc, provider }
}
const synced = ({ provider }, name) => until(() => provider.synced, `${name} to sync`)
const fail = (message) => { console.error(message); process.exit(1) }

// A document as comparable JSON: object keys sorted (yrs may re-encode maps in another order), binary and
// subdocuments spelled out.
const plain = (value) => {
  if (value instanceof Y.Doc) return `doc:${value.guid}`
  if (value instanceof Y.AbstractType) return plain(value.toJSON())
  if (value instanceof Uint8Array) return `bytes:${[...value]}`
  if (value === undefined) return 'undefined'
  if (Array.isArray(value)) return value.map(plain)
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.keys(value).sort().map((key) => [key, plain(value[key])]))
  }
  return value
}
const view = (doc) => JSON.stringify({
  text: plain(doc.getText('text').toDelta()),
  xml: doc.getXmlFragment('xml').toString(),
  map: plain(Object.fromEntries(doc.getMap('map').entries())),
  array: plain(doc.getArray('array').toArray()),
  clocks: [...Y.decodeStateVector(Y.encodeStateVector(doc))].sort()
})
const until = (predicate, what, ms = 20000) => new Promise((resolve) => {
  const started = Date.now()
  const check = () => {
    if (predicate()) resolve()
    else if (Date.now() - started > ms) fail(`timed out: ${what}; server closes: ${closes.join(' | ') || 'none'}`)
    else setTimeout(check, 10)
  }
  check()
})

const steps = (doc) => {
  const text = doc.getText('text')
  const map = doc.getMap('map')
  const array = doc.getArray('array')
  return {
    'formatted text': () => { text.insert(0, 'Hello world', { bold: true }); text.format(0, 5, { italic: true, bold: null }) },
    embed: () => text.insertEmbed(3, { image: 'https://example.com/a.png', alt: 'a' }, { link: 'x' }),
    emoji: () => text.insert(text.length, ' a😀b👍🏽c 𝄞'),
    'emoji cut by a deletion': () => text.delete(text.length - 1, 1), // the second unit of 𝄞
    'emoji cut by an insertion': () => text.insert(text.length - 4, '|'), // between the units of 🏽
    'ProseMirror-style XML': () => {
      const paragraph = new Y.XmlElement('paragraph')
      paragraph.setAttribute('align', 'left')
      const run = new Y.XmlText()
      paragraph.insert(0, [run])
      doc.getXmlFragment('xml').insert(0, [paragraph, new Y.XmlElement('horizontal_rule')])
      run.insert(0, 'strong words', { strong: {} })
      run.format(0, 6, { em: {} })
    },
    'map values': () => {
      map.set('bytes', new Uint8Array([0, 1, 255]))
      map.set('undefined', undefined)
      map.set('null', null)
      map.set('numbers', [0.1, -5, 2 ** 53 - 1, 1e300])
      map.set('nested', { list: [1, { deep: 'é' }], flag: true })
      map.set('long', 'x'.repeat(70000))
    },
    'nested types': () => {
      map.set('ymap', new Y.Map([['k', 'v']]))
      map.set('yarray', Y.Array.from([1, 2]))
      map.set('ytext', new Y.Text('inner'))
      map.get('ymap').set('deeper', new Y.Array())
      map.get('ymap').get('deeper').push([new Y.Map([['x', 1]])])
    },
    subdocument: () => map.set('page', new Y.Doc()),
    array: () => { array.push([1, 'two', null, new Uint8Array([9]), [3, 4], { o: 1 }]); array.insert(1, [new Y.Map()]); array.delete(0, 1) },
    undo: () => {
      const undo = new Y.UndoManager(text, { captureTimeout: 0 })
      text.insert(0, 'undo me ')
      undo.undo()
      undo.redo()
      undo.undo()
    },
    'a 1 MB paste': () => text.insert(text.length, 'lorem ipsum dolor sit amet '.repeat(40000)),
    'many small edits': () => { for (let i = 0; i < 300; i++) text.insert(i % (text.length + 1), String.fromCharCode(65 + i % 26)) },
    'deleting most of the paste': () => text.delete(text.length - 1000000, 900000)
  }
}

if (phase === 'edit') {
  const a = client('a')
  const b = client('b')
  await Promise.all([synced(a, 'the first client'), synced(b, 'the second client')])
  for (const [name, step] of Object.entries(steps(a.doc))) {
    step()
    await until(() => view(a.doc) === view(b.doc), `the second client to receive "${name}"`)
    if (closes.length) fail(`the server closed a connection after "${name}": ${closes.join(' | ')}`)
  }
  fs.writeFileSync(file, Y.encodeStateAsUpdate(a.doc))
  a.provider.destroy()
  b.provider.destroy()
} else if (phase === 'check') {
  const expected = new Y.Doc()
  Y.applyUpdate(expected, fs.readFileSync(file))
  const c = client('c')
  await synced(c, 'a new client')
  await until(() => view(c.doc) === view(expected), 'a new client to get the stored document')
  c.provider.destroy()
} else {
  fail(`unknown phase ${phase}`)
}
process.exit(0)
