// Cross-language check for web_demo/src/model.js (driven by tests/model/test_js_interop.py).
//   node js_model_check.mjs build          -> {update, json}: a doc built by three JS replicas
//   node js_model_check.mjs retry <base64> -> {update, json}: loads a doc, resolves, then writes
//                                              a "processing" retry on every entry
import * as Y from 'yjs'
import * as model from '../../web_demo/src/model.js'

const sync = (from, to) => Y.applyUpdate(to, Y.encodeStateAsUpdate(from, Y.encodeStateVector(to)))

function build () {
  const [a, b, c] = [1, 2, 3].map((clientID) => {
    const doc = new Y.Doc()
    doc.clientID = clientID
    return doc
  })
  model.createBlock(a, 'b1', 'paragraph', 'hello')
  model.addIndexEntry(a, 'b1', 'vector', { metadata: { model: 'm1', dims: 3 }, ts: 10 })
  model.addIndexEntry(a, 'b1', 'keyword', { ts: 10 })
  model.createBlock(a, 'b2', 'heading', 'title')
  model.addIndexEntry(a, 'b2', 'vector', { ts: 10 })
  for (const doc of [b, c]) sync(a, doc)
  model.setStatus(a, 'b1', 'vector', 'done', 20) // concurrent with b's error and c's processing
  model.setStatus(b, 'b1', 'vector', 'error', 21)
  model.setStatus(c, 'b1', 'vector', 'processing', 22)
  model.setStatus(b, 'b1', 'keyword', 'error', 20)
  sync(b, c)
  model.setStatus(c, 'b1', 'keyword', 'processing', 30) // a retry that saw the error
  model.setStatus(a, 'b2', 'vector', 'processing', 20)
  model.setStatus(a, 'b2', 'vector', 'done', 21)
  model.blockContent(c, 'b2').insert(5, '!')
  for (const doc of [b, c]) sync(doc, a)
  return a
}

function retry (base64) {
  const doc = new Y.Doc()
  doc.clientID = 99
  Y.applyUpdate(doc, Buffer.from(base64, 'base64'))
  const resolved = model.blocksToJSON(doc)
  for (const [blockId, block] of Object.entries(resolved)) {
    for (const entry of block.indexingList) model.setStatus(doc, blockId, entry.index_name, 'processing', 40)
  }
  return { doc, json: resolved }
}

const [mode, arg] = process.argv.slice(2)
const { doc, json } = mode === 'build' ? { doc: build() } : retry(arg)
const update = Buffer.from(Y.encodeStateAsUpdate(doc)).toString('base64')
process.stdout.write(JSON.stringify({ update, json: json ?? model.blocksToJSON(doc) }))
