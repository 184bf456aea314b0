// A real Yjs client (npm yjs + y-websocket WebsocketProvider) driven by JSON lines on stdin/stdout.
// Protocol: see README.md next to this file. One Y.Doc per process.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import * as awarenessProtocol from 'y-protocols/awareness'
import * as authProtocol from 'y-protocols/auth'
import * as decoding from 'lib0/decoding'
import WebSocket from 'ws'
import * as readline from 'node:readline'

const MESSAGE_AUTH = 2

const doc = new Y.Doc()
const awareness = new awarenessProtocol.Awareness(doc)
/** @type {WebsocketProvider | null} */
let provider = null
let boundUrl = null
/** Root types reported in the state: name -> kind ('map' | 'text' | 'array'). */
const roots = new Map([['map', 'map'], ['text', 'text'], ['array', 'array']])

const write = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const emitEvent = (event, data = {}) => write({ event, ...data })

const root = (kind, name = kind) => {
  const known = roots.get(name)
  if (known !== undefined && known !== kind) throw new Error(`root "${name}" is a ${known}, not a ${kind}`)
  roots.set(name, kind)
  if (kind === 'map') return doc.getMap(name)
  if (kind === 'text') return doc.getText(name)
  if (kind === 'array') return doc.getArray(name)
  throw new Error(`unknown root kind "${kind}"`)
}

const status = () => provider === null
  ? 'disconnected'
  : provider.wsconnected ? 'connected' : provider.wsconnecting ? 'connecting' : 'disconnected'

const socketOpen = () => provider !== null && provider.wsconnected && provider.ws?.readyState === WebSocket.OPEN

const snapshot = () => {
  const docJson = {}
  for (const [name, kind] of roots) {
    const type = root(kind, name)
    docJson[name] = kind === 'text' ? type.toString() : type.toJSON()
  }
  return {
    doc: docJson,
    awareness: Object.fromEntries(awareness.getStates()),
    // meta keeps every clientID this awareness ever applied (removed ones too) with its latest clock
    awareness_clocks: Object.fromEntries(Array.from(awareness.meta, ([clientID, meta]) => [clientID, meta.clock])),
    synced: provider !== null && provider.synced,
    status: status(),
    client_id: doc.clientID
  }
}

// ---- event-driven waits: predicates are re-evaluated (at most once per macrotask) after any change
const waiters = new Set()
let checkScheduled = false
const scheduleCheck = () => {
  if (checkScheduled || waiters.size === 0) return
  checkScheduled = true
  setImmediate(() => {
    checkScheduled = false
    if (waiters.size === 0) return
    const state = snapshot()
    for (const waiter of waiters) waiter(state)
  })
}
doc.on('update', scheduleCheck)
awareness.on('update', scheduleCheck) // 'update' includes renewals, 'change' does not

const waitFor = ({ expr, timeout_ms = 10000 }) => {
  const names = 'const { doc, awareness, awareness_clocks, synced, status, client_id } = state'
  const predicate = new Function('state', `${names}; return (${expr})`)
  return new Promise((resolve, reject) => {
    let lastError = null
    const waiter = (state) => {
      let ok = false
      try {
        ok = predicate(state)
      } catch (err) {
        lastError = err
      }
      if (ok) {
        finish()
        resolve(state)
      }
    }
    const timer = setTimeout(() => {
      finish()
      const because = lastError === null ? '' : ` (last evaluation threw ${lastError})`
      const state = JSON.stringify(snapshot())
      reject(new Error(`timeout after ${timeout_ms} ms waiting for ${expr}${because}; state: ${state}`))
    }, timeout_ms)
    const finish = () => {
      clearTimeout(timer)
      waiters.delete(waiter)
    }
    waiters.add(waiter)
    waiter(snapshot())
  })
}

// ---- provider lifecycle
const requireProvider = () => {
  if (provider === null) throw new Error('not connected yet')
  return provider
}

const watchAuthMessages = (p) => {
  const handleAuth = p.messageHandlers[MESSAGE_AUTH]
  p.messageHandlers[MESSAGE_AUTH] = (encoder, decoder, prov, emitSynced, messageType) => {
    authProtocol.readAuthMessage(decoding.clone(decoder), doc, (_doc, reason) => emitEvent('auth', { reason }))
    handleAuth(encoder, decoder, prov, emitSynced, messageType)
  }
}

const connect = ({ url, room, params = {}, options = {} }) => {
  if (provider === null) {
    if (url === undefined || room === undefined) throw new Error('first connect needs url and room')
    boundUrl = url
    provider = new WebsocketProvider(url, room, doc, {
      awareness, params, WebSocketPolyfill: WebSocket, disableBc: true, ...options, connect: false
    })
    watchAuthMessages(provider)
    provider.on('status', ({ status }) => { emitEvent('status', { status }); scheduleCheck() })
    provider.on('sync', (synced) => { emitEvent('synced', { synced }); scheduleCheck() })
    provider.on('connection-close', (event) => emitEvent('connection-close', event === null
      ? { code: null, reason: null, local: true }
      : { code: event.code, reason: event.reason, local: false }))
    provider.on('connection-error', (event) =>
      emitEvent('connection-error', { message: event?.message ?? String(event) }))
    provider.on('closed', ({ code, reason }) => emitEvent('closed', { code, reason }))
    provider.connect()
  } else {
    if ((url !== undefined && url !== boundUrl) || (room !== undefined && room !== provider.roomname)) {
      throw new Error('this peer is bound to another url/room; start a new peer')
    }
    if (Object.keys(params).length) provider.params = params // e.g. a refreshed token, as an app would set it
    provider.connect()
  }
  return { status: status() }
}

// Resolves once the socket finished closing: every frame sent before the close reached the server, and a
// process exit cannot drop them (closing a socket with unread input makes the kernel send RST).
const socketClosed = (socket) => new Promise((resolve) => {
  if (socket === null || socket.readyState === WebSocket.CLOSED) resolve()
  else socket.once('close', resolve)
})

const disconnect = async () => {
  const p = requireProvider()
  const socket = p.ws
  p.disconnect()
  await socketClosed(socket)
  return {}
}

// ---- bursts of small updates
const burstEdit = (kind, name, tag, i) => {
  if (kind === 'text') {
    const text = root('text', name)
    text.insert(text.length, `${tag}${i};`)
  } else if (kind === 'map') {
    root('map', name).set(`${tag}${i}`, i)
  } else if (kind === 'array') {
    root('array', name).push([`${tag}${i}`])
  } else {
    throw new Error(`unknown burst kind "${kind}"`)
  }
}

// `sent` counts the updates y-websocket handed to an open socket (the others stay local until a resync). A burst
// makes `n` edits, or fewer if `stop_burst` comes first: `n` in the answer is how many it made.
let burstStopped = false
const burst = async ({ n, kind = 'text', name = kind, tag = '', yield_every = 1, pause_ms = 0, then_disconnect = false }) => {
  let sent = 0
  let i = 0
  burstStopped = false
  for (; i < n && !burstStopped; i++) {
    if (socketOpen()) sent++
    burstEdit(kind, name, tag, i)
    if (yield_every > 0 && (i + 1) % yield_every === 0) {
      await new Promise(resolve => pause_ms > 0 ? setTimeout(resolve, pause_ms) : setImmediate(resolve))
    }
  }
  if (then_disconnect) await disconnect()
  return { n: i, sent }
}

const toBase64 = (bytes) => Buffer.from(bytes).toString('base64')
const fromBase64 = (text) => new Uint8Array(Buffer.from(text, 'base64'))

const commands = {
  connect,
  disconnect,
  // drop the socket without a closing handshake (like a network failure); y-websocket reconnects if asked to
  terminate: ({ reconnect = true }) => {
    const p = requireProvider()
    if (!reconnect) p.shouldConnect = false
    p.ws?.terminate()
    return {}
  },
  map_set: ({ key, value, name }) => { root('map', name).set(key, value); return {} },
  map_delete: ({ key, name }) => { root('map', name).delete(key); return {} },
  text_insert: ({ index, text, name }) => { root('text', name).insert(index, text); return {} },
  text_delete: ({ index, length, name }) => { root('text', name).delete(index, length); return {} },
  array_push: ({ values, name }) => { root('array', name).push(values); return {} },
  array_delete: ({ index, length, name }) => { root('array', name).delete(index, length); return {} },
  track: ({ name, kind }) => { root(kind, name); return {} },
  set_awareness: ({ state }) => { awareness.setLocalState(state); return {} },
  get_state: () => snapshot(),
  wait_for: waitFor,
  burst,
  stop_burst: () => { burstStopped = true; return {} },
  state_vector: () => {
    const sv = Y.encodeStateVector(doc)
    return { base64: toBase64(sv), clocks: Object.fromEntries(Y.decodeStateVector(sv)) }
  },
  encode_state_as_update: ({ state_vector }) =>
    ({ update: toBase64(Y.encodeStateAsUpdate(doc, state_vector ? fromBase64(state_vector) : undefined)) }),
  apply_update: ({ update }) => { Y.applyUpdate(doc, fromBase64(update), 'peer.apply_update'); return {} }
}

const handleLine = async (line) => {
  if (line.trim() === '') return
  let request
  try {
    request = JSON.parse(line)
  } catch (err) {
    write({ id: null, ok: false, error: `bad JSON: ${err.message}` })
    return
  }
  const { id, cmd, ...args } = request
  try {
    const command = commands[cmd]
    if (command === undefined) throw new Error(`unknown command "${cmd}"`)
    write({ id, ok: true, result: await command(args) })
  } catch (err) {
    write({ id, ok: false, error: err?.message ?? String(err) })
  }
}

readline.createInterface({ input: process.stdin }).on('line', handleLine).on('close', async () => {
  const socket = provider?.ws ?? null
  provider?.destroy()
  awareness.destroy()
  await socketClosed(socket)
  process.exit(0)
})
