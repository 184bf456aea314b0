/**
 * Block document model — JS twin of collab_server/model (keep both in sync, see docs/model.md).
 *
 * Shape of a Y.Doc:
 *   ydoc.getMap('blocks'): Y.Map  blockId -> Y.Map {
 *     id: string,
 *     type: string,
 *     content: Y.Text,
 *     indexingList: Y.Array<Y.Map> of index entries {
 *       index_name: string,
 *       status: string,          // MATERIALISED resolved status (written by the server / local writer)
 *       timestamp: number,       // ms since epoch of the last local status write
 *       statusWrites: Y.Array<object> of plain write records
 *         { id: "<clientID>:<random hex>", status: string, seen: string[], ts: number },
 *       ...free metadata keys (any JSON value)
 *     }
 *   }
 *
 * Status = multi-value register with priority error > done > processing > notStarted.
 * A write record's `seen` lists the frontier ids its writer had seen; the frontier is every
 * record whose id is in no other record's `seen`; the resolved status is the highest-priority
 * status on the frontier. setStatus deletes the records it supersedes in the same transaction.
 * Always read statuses with resolvedStatus()/entryStatus(), never the raw `status` key.
 */
import * as Y from 'yjs'

/** Priority of each known status; unknown statuses rank below all of them. */
export const STATUS_PRIORITY = Object.freeze({ notStarted: 0, processing: 1, done: 2, error: 3 })

const RESERVED = new Set(['index_name', 'status', 'timestamp', 'statusWrites'])

const priority = (status) => (status in STATUS_PRIORITY ? STATUS_PRIORITY[status] : -1)

/** Records not superseded by any other record (pure). */
export function frontier (records) {
  const seen = new Set(records.flatMap((r) => r.seen))
  return records.filter((r) => !seen.has(r.id))
}

/** Highest-priority frontier status (ties between unknown statuses: greatest string), or null. */
export function resolveWrites (records) {
  let best = null
  for (const { status } of frontier(records)) {
    if (best === null || priority(status) > priority(best) ||
        (priority(status) === priority(best) && status > best)) best = status
  }
  return best
}

/** Resolved status of an index entry Y.Map (falls back to its materialised status). */
export function entryStatus (entry) {
  const writes = entry.get('statusWrites')
  return (writes && resolveWrites(writes.toArray())) ?? entry.get('status') ?? null
}

export const blocksMap = (doc) => doc.getMap('blocks')

export const getBlock = (doc, blockId) => blocksMap(doc).get(blockId)

/** Create a block (or return the existing one with that id). */
export function createBlock (doc, blockId, type, content = '') {
  const existing = getBlock(doc, blockId)
  if (existing) return existing
  const block = new Y.Map()
  doc.transact(() => {
    blocksMap(doc).set(blockId, block)
    block.set('id', blockId)
    block.set('type', type)
    block.set('content', new Y.Text(content))
    block.set('indexingList', new Y.Array())
  })
  return block
}

/** Delete a block; returns whether it existed. */
export function deleteBlock (doc, blockId) {
  if (!blocksMap(doc).has(blockId)) return false
  blocksMap(doc).delete(blockId)
  return true
}

function requireBlock (doc, blockId) {
  const block = getBlock(doc, blockId)
  if (!block) throw new Error(`no block ${blockId}`)
  return block
}

/** The block's content Y.Text (edit it with insert/delete). */
export const blockContent = (doc, blockId) => requireBlock(doc, blockId).get('content')

const newWriteId = (doc) => {
  const bytes = crypto.getRandomValues(new Uint8Array(8))
  return `${doc.clientID}:${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`
}

/** Append a write superseding every current record, deleting those records (one transaction). */
function writeStatus (doc, entry, status, ts) {
  const writes = entry.get('statusWrites')
  const seen = frontier(writes.toArray()).map((r) => r.id)
  writes.delete(0, writes.length)
  entry.set('status', status)
  entry.set('timestamp', ts)
  writes.push([{ id: newWriteId(doc), status, seen, ts }])
}

/** First entry named indexName in the block (array order), or undefined. */
export function findIndexEntry (doc, blockId, indexName) {
  const block = getBlock(doc, blockId)
  return block?.get('indexingList').toArray().find((e) => e.get('index_name') === indexName)
}

/** Add an index entry (or return the existing one with that name). */
export function addIndexEntry (doc, blockId, indexName, { status = 'notStarted', metadata = {}, ts = Date.now() } = {}) {
  const list = requireBlock(doc, blockId).get('indexingList')
  const existing = findIndexEntry(doc, blockId, indexName)
  if (existing) return existing
  const entry = new Y.Map()
  doc.transact(() => {
    list.push([entry])
    entry.set('index_name', indexName)
    for (const [key, value] of Object.entries(metadata)) {
      if (RESERVED.has(key)) throw new Error(`reserved entry key ${key}`)
      entry.set(key, value)
    }
    entry.set('statusWrites', new Y.Array())
    writeStatus(doc, entry, status, ts)
  })
  return entry
}

/** Remove the first entry named indexName; returns whether one existed. */
export function removeIndexEntry (doc, blockId, indexName) {
  const list = getBlock(doc, blockId)?.get('indexingList')
  const index = list ? list.toArray().findIndex((e) => e.get('index_name') === indexName) : -1
  if (index < 0) return false
  list.delete(index, 1)
  return true
}

/** Record a status write that has seen the current frontier; returns the new resolved status. */
export function setStatus (doc, blockId, indexName, status, ts = Date.now()) {
  const entry = findIndexEntry(doc, blockId, indexName)
  if (!entry) throw new Error(`no index entry ${blockId}/${indexName}`)
  doc.transact(() => writeStatus(doc, entry, status, ts))
  return status // the new write supersedes every record this replica has
}

/** Resolved status of an index entry, or null if the block/entry does not exist. */
export function resolvedStatus (doc, blockId, indexName) {
  const entry = findIndexEntry(doc, blockId, indexName)
  return entry ? entryStatus(entry) : null
}

/** Plain JSON of all blocks with resolved statuses (no write records). */
export function blocksToJSON (doc) {
  const out = {}
  blocksMap(doc).forEach((block, blockId) => {
    out[blockId] = {
      id: block.get('id'),
      type: block.get('type'),
      content: block.get('content').toString(),
      indexingList: block.get('indexingList').toArray().map((entry) => {
        const json = entry.toJSON()
        delete json.statusWrites
        return { ...json, status: entryStatus(entry) }
      })
    }
  })
  return out
}
