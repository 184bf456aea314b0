// Web demo entry point: one Y.Doc per room, kept in IndexedDB and synced over y-websocket
// with the server that served this page (ws(s)://<host>/<room>, room from ?room=, default "demo").
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { blocksToJSON } from './model.js'
import { addBlock, mountBlocks } from './blocks-view.js'
import { DELETED_CODE, bindConnection, offlinePreferred } from './connection.js'
import { persistLocally } from './local-store.js'
import { bindPresence, refreshPresenceOnReconnect } from './presence.js'
import { bindVersions } from './versions.js'
import { pageToken, readOnlyToken } from './access.js'

const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`)

const room = new URLSearchParams(location.search).get('room') || 'demo'
const serverUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`
// the browser resolves "." and ".." parts of the URL, so such a room cannot be reached (the server names none)
const reachable = !room.split('/').some((part) => part === '.' || part === '..')

const doc = new Y.Doc()
const local = persistLocally(`collab-demo:${room}`, doc, byTestId('local-save'))
const token = pageToken()
const provider = new WebsocketProvider(serverUrl, encodeURIComponent(room), doc,
  { connect: reachable && !offlinePreferred(room), params: token ? { token } : {} })
// a read-only token: the server refuses this page's edits, so the editor is not offered
const readOnly = token !== null && readOnlyToken(token)
if (readOnly) {
  byTestId('editor').disabled = true
  byTestId('access').textContent = 'Read-only'
}
// Deleted on the server: y-websocket stops reconnecting. Drop the local copy too, or the next visit uploads it,
// and leave the tabs of this browser (y-websocket's BroadcastChannel), telling those in this room: one still
// holding the document would hand it to a tab opened later, which would upload it.
const DELETED_KEY = `collab-demo:deleted:${room}`
let deleted = false
provider.on('closed', ({ code }) => {
  if (code !== DELETED_CODE || deleted) return
  deleted = true
  provider.disconnect()
  local.forget()
  localStorage.setItem(DELETED_KEY, String(Date.now())) // a 'storage' event in this room's other tabs
})
window.addEventListener('storage', (event) => {
  if (event.key === DELETED_KEY && event.newValue !== null) {
    provider.emit('closed', [{ code: DELETED_CODE, reason: 'document deleted' }])
  }
})

document.title = `${room} · collab demo`
byTestId('room-name').textContent = room
bindConnection(provider, room, {
  indicator: byTestId('connection-status'),
  toggle: byTestId('offline-toggle'),
  onOnline: () => { // after a deletion the user starts the document again: save it locally again too
    deleted = false
    local.resume()
  }
})
if (!reachable) {
  byTestId('offline-toggle').disabled = true
  provider.emit('closed', [{ here: true, reason: 'Unreachable: a room name cannot have "." or ".." parts' }])
}
bindPresence(provider.awareness, { list: byTestId('presence-list'), nameInput: byTestId('user-name') })
refreshPresenceOnReconnect(provider)
mountBlocks(doc, byTestId('blocks'))

const refreshVersions = bindVersions(room, { token, readOnly }, {
  form: byTestId('save-version-form'),
  label: byTestId('version-label'),
  list: byTestId('version-list'),
  message: byTestId('version-message')
})
byTestId('versions').addEventListener('toggle', (event) => { if (event.target.open) refreshVersions() })

byTestId('add-block-form').addEventListener('submit', (event) => {
  event.preventDefault()
  const block = addBlock(doc, byTestId('block-type').value)
  document.querySelector(`[data-block-id="${block.get('id')}"] textarea`)?.focus()
})

// a read-only JSON view of the whole document, refreshed at most once per frame
const json = byTestId('doc-json')
let queued = false
// any client may store a BigInt, which JSON.stringify refuses
const showJSON = () => {
  json.textContent = JSON.stringify(blocksToJSON(doc), (k, v) => (typeof v === 'bigint' ? String(v) : v), 2)
}
doc.on('update', () => {
  if (queued) return
  queued = true
  requestAnimationFrame(() => {
    queued = false
    showJSON()
  })
})
showJSON()

// handy from the devtools console
window.collabDemo = { Y, doc, provider, room, get persistence () { return local.persistence() } }
