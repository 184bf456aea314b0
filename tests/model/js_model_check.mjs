// Cross-language check for web_demo/src/model.js (driven by tests/model/test_js_interop.py).
//   node js_model_check.mjs build          -> {update, json}: a doc built by three JS replicas
//   node js_model_check.mjs retry <base64> -> {update, json}: loads a doc, resolves, then writes
//                                              a "processing" retry on every entry
//   node js_model_check.mjs junk           -> {update, json, resolved, removed, errors, entries}: junk shapes
//                                              next to one good block, read and written through model.js
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
  // values JSON has not: both views show them alike (base64, null)
  model.findIndexEntry(c, 'b2', 'vector').set('raw', new Uint8Array([1, 2, 250]))
  model.findIndexEntry(c, 'b2', 'vector').set('unset', undefined)
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

const yMap = (entries) => {
  const map = new Y.Map()
  for (const [key, value] of Object.entries(entries)) map.set(key, value)
  return map
}

/** Every shape the model does not expect, next to a good block; readers must skip the junk. */
function junk () {
  const doc = new Y.Doc()
  doc.clientID = 7
  const errors = {}
  const attempt = (name, write) => {
    try { write() } catch (error) { errors[name] = error.message }
  }
  model.createBlock(doc, 'good', 'paragraph', 'hello')
  model.addIndexEntry(doc, 'good', 'vector', { metadata: { model: 'm1' }, ts: 10 })
  model.addIndexEntry(doc, 'good', 'keyword', { ts: 10 })
  model.addIndexEntry(doc, 'good', 'proto', { ts: 10 })
  const goodList = model.getBlock(doc, 'good').get('indexingList')
  goodList.insert(0, [5, 'junk', new Y.Text('x')]) // junk before the entries
  model.setStatus(doc, 'good', 'vector', 'done', 20)
  const badRecords = () => ['junk', 5, null, [], new Y.Map(), { id: 5, status: 'error', seen: [] },
    { id: 'a', status: 3, seen: [] }, { id: 'b', status: 'error', seen: 'x' },
    { id: 'c', status: 'error', seen: [1] }, { status: 'error', seen: [] }]
  model.findIndexEntry(doc, 'good', 'vector').get('statusWrites').push(badRecords())
  // a concurrent record whose status is an Object.prototype key ranks like any unknown status
  const protoWrites = model.findIndexEntry(doc, 'good', 'proto').get('statusWrites')
  protoWrites.insert(0, [{ id: 'p', status: 'constructor', seen: [] }])

  const blocks = model.blocksMap(doc)
  blocks.set('num', 42)
  blocks.set('str', 'junk')
  blocks.set('nil', null)
  blocks.set('text', new Y.Text('t'))
  blocks.set('arr', Y.Array.from([1, 2]))
  blocks.set('noList', yMap({ id: 'noList', type: 'paragraph', content: new Y.Text('c') }))
  blocks.set('textList', yMap({ id: 'textList', content: 7, indexingList: new Y.Text('oops') }))
  blocks.set('mapList', yMap({ indexingList: yMap({ index_name: 'idx' }) }))
  blocks.set('mixed', yMap({
    id: new Y.Text('mixed'),
    type: 3,
    content: 7,
    indexingList: Y.Array.from([1, 'x', null, new Y.Text('t'), Y.Array.from([]), { index_name: 'idx', status: 'done' },
      yMap({ index_name: 'idx', status: 'done', statusWrites: Y.Array.from(badRecords()) }),
      yMap({ index_name: 'idx2', status: 'error', statusWrites: 'not an array' }),
      yMap({ index_name: 'idx3', status: 5 })])
  }))

  const ids = [...blocks.keys()].sort()
  const names = ['vector', 'keyword', 'proto', 'idx', 'idx2', 'idx3']
  const resolved = Object.fromEntries(ids.map((id) =>
    [id, Object.fromEntries(names.map((name) => [name, model.resolvedStatus(doc, id, name)]))]))
  const removed = {
    keyword: model.removeIndexEntry(doc, 'good', 'keyword'),
    missing: ids.filter((id) => model.removeIndexEntry(doc, id, 'nope'))
  }
  attempt('addToNumber', () => model.addIndexEntry(doc, 'num', 'idx'))
  attempt('addToNoList', () => model.addIndexEntry(doc, 'noList', 'idx'))
  attempt('addToTextList', () => model.addIndexEntry(doc, 'textList', 'idx'))
  attempt('setOnNumber', () => model.setStatus(doc, 'num', 'idx', 'done'))
  attempt('setOnPlainEntry', () => model.setStatus(doc, 'mixed', 'nope', 'done'))
  attempt('contentOfNumber', () => model.blockContent(doc, 'num'))
  attempt('contentNotText', () => model.blockContent(doc, 'mixed'))
  model.setStatus(doc, 'mixed', 'idx2', 'done', 50) // an entry with junk statusWrites gets a fresh array
  const entries = Object.fromEntries(ids.map((id) =>
    [id, model.entries(model.getBlock(doc, id)).map((entry) => [entry.get('index_name'), model.entryStatus(entry)])]))
  return { doc, resolved, removed, errors, entries }
}

const [mode, arg] = process.argv.slice(2)
const { doc, json, ...rest } = mode === 'build' ? { doc: build() } : mode === 'junk' ? junk() : retry(arg)
const update = Buffer.from(Y.encodeStateAsUpdate(doc)).toString('base64')
process.stdout.write(JSON.stringify({ update, json: json ?? model.blocksToJSON(doc), ...rest }))
