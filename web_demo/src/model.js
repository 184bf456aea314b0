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
 *
 * Clients may store anything in a document: readers skip whatever is not shaped as above (blocks
 * that are not Y.Maps, entries that are not Y.Maps, write records failing isRecord) and leave it in
 * place; writers throw an Error when the block or entry they need is missing or malformed.
 */
import * as Y from 'yjs'

/** Priority of each known status; unknown statuses rank below all of them. */
export const STATUS_PRIORITY = Object.freeze({ notStarted: 0, processing: 1, done: 2, error: 3 })

const RESERVED = new Set(['index_name', 'status', 'timestamp', 'statusWrites'])

const priority = (status) => (Object.hasOwn(STATUS_PRIORITY, status) ? STATUS_PRIORITY[status] : -1)

/** Whether `value` has the shape of a write record. */
export const isRecord = (value) => typeof value?.id === 'string' && typeof value.status === 'string' &&
  Array.isArray(value.seen) && value.seen.every((id) => typeof id === 'string')

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

/** The entry's well-formed write records (malformed ones are ignored). */
export function statusRecords (entry) {
  const writes = entry.get('statusWrites')
  return writes instanceof Y.Array ? writes.toArray().filter(isRecord) : []
}

/** Resolved status of an index entry Y.Map (falls back to its materialised status if that is a string). */
export function entryStatus (entry) {
  const status = entry.get('status')
  return resolveWrites(statusRecords(entry)) ?? (typeof status === 'string' ? status : null)
}

export const blocksMap = (doc) => doc.getMap('blocks')

/** The block Y.Map, or undefined (also when something other than a Y.Map is stored under that id). */
export function getBlock (doc, blockId) {
  const block = blocksMap(doc).get(blockId)
  return block instanceof Y.Map ? block : undefined
}

/** The block's indexingList Y.Array, or undefined if `block` is not a block or has none. */
function indexingList (block) {
  const list = block instanceof Y.Map ? block.get('indexingList') : undefined
  return list instanceof Y.Array ? list : undefined
}

/** The block's index entry Y.Maps in array order (anything else in its indexingList is skipped). */
export const entries = (block) => (indexingList(block)?.toArray() ?? []).filter((e) => e instanceof Y.Map)

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
export function blockContent (doc, blockId) {
  const content = requireBlock(doc, blockId).get('content')
  if (!(content instanceof Y.Text)) throw new Error(`block ${blockId} has no content text`)
  return content
}

const newWriteId = (doc) => {
  const bytes = crypto.getRandomValues(new Uint8Array(8))
  return `${doc.clientID}:${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`
}

/** Append a write superseding every current record, deleting all records (one transaction). */
function writeStatus (doc, entry, status, ts) {
  const seen = frontier(statusRecords(entry)).map((r) => r.id)
  let writes = entry.get('statusWrites')
  if (writes instanceof Y.Array) writes.delete(0, writes.length)
  else entry.set('statusWrites', (writes = new Y.Array()))
  entry.set('status', status)
  entry.set('timestamp', ts)
  writes.push([{ id: newWriteId(doc), status, seen, ts }])
}

/** First entry named indexName in the block (array order), or undefined. */
export function findIndexEntry (doc, blockId, indexName) {
  return entries(getBlock(doc, blockId)).find((e) => e.get('index_name') === indexName)
}

/** Add an index entry (or return the existing one with that name). */
export function addIndexEntry (doc, blockId, indexName, { status = 'notStarted', metadata = {}, ts = Date.now() } = {}) {
  const list = indexingList(requireBlock(doc, blockId))
  if (!list) throw new Error(`block ${blockId} has no indexingList array`)
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
  const list = indexingList(getBlock(doc, blockId))
  const index = list ? list.toArray().findIndex((e) => e instanceof Y.Map && e.get('index_name') === indexName) : -1
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

/** A value as the server's JSON view shows it (collab_server/model/blocks.py `_plain`): texts and XML types as their
 * strings, binary values in base64, subdocuments and undefined as null (JSON.stringify dropped undefined keys). */
const plain = (value) => {
  if (value === undefined || value instanceof Y.Doc) return null
  if (value instanceof Uint8Array) return btoa(String.fromCharCode(...value))
  if (value instanceof Y.Text || value instanceof Y.XmlFragment) return value.toString()
  if (value instanceof Y.Map) return Object.fromEntries([...value.entries()].map(([key, item]) => [key, plain(item)]))
  if (value instanceof Y.Array) return value.toArray().map(plain)
  if (Array.isArray(value)) return value.map(plain)
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, plain(item)]))
  }
  return typeof value === 'number' && !Number.isFinite(value) ? null : value
}

/** Plain JSON of all blocks with resolved statuses (no write records; blocks that are not Y.Maps skipped). */
export function blocksToJSON (doc) {
  const blocks = [...blocksMap(doc).entries()].filter(([, block]) => block instanceof Y.Map)
  return Object.fromEntries(blocks.map(([blockId, block]) => {
    const content = block.get('content')
    return [blockId, {
      id: plain(block.get('id')),
      type: plain(block.get('type')),
      content: content instanceof Y.Text ? content.toString() : '',
      indexingList: entries(block).map((entry) => {
        const { statusWrites, ...json } = plain(entry)
        return { ...json, status: entryStatus(entry) }
      })
    }]
  }))
}
