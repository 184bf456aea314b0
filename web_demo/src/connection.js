// Connection indicator and the "work offline" toggle. The toggle is kept in localStorage for each room,
// so a page reloaded while offline stays offline (its edits live in IndexedDB meanwhile).

const offlineKey = (room) => `collab-demo:offline:${room}`

export const offlinePreferred = (room) => localStorage.getItem(offlineKey(room)) === '1'

/** The server closes a deleted document's connections with this code; y-websocket does not reconnect. */
export const DELETED_CODE = 4410

/**
 * [state, label]: state is 'online' (connected and synced), 'syncing' (connecting or catching up), 'offline',
 * or, after the server closed the connection for good (`closed`: y-websocket's event), 'deleted' / 'closed'.
 */
export function connectionState (provider, closed = null) {
  if (provider.wsconnected) return provider.synced ? ['online', 'Online'] : ['syncing', 'Syncing…']
  if (provider.shouldConnect) return ['syncing', 'Connecting…']
  if (closed?.code === DELETED_CODE) return ['deleted', 'Deleted on the server']
  if (closed?.here) return ['closed', closed.reason]
  if (closed) return ['closed', `Closed by the server: ${closed.reason || closed.code}`]
  return ['offline', 'Offline']
}

/**
 * Wire the indicator element and the offline checkbox of `room` to the provider; `onOnline` runs when the user
 * goes online (again).
 */
export function bindConnection (provider, room, { indicator, toggle, onOnline }) {
  let closed = null
  const render = () => {
    const [state, label] = connectionState(provider, closed)
    indicator.dataset.state = state
    indicator.textContent = label
    toggle.checked = !provider.shouldConnect
  }
  toggle.addEventListener('change', () => {
    localStorage.setItem(offlineKey(room), toggle.checked ? '1' : '0')
    closed = null // going online again is deliberate, even after the server closed us for good
    if (toggle.checked) provider.disconnect()
    else {
      onOnline()
      provider.connect()
    }
    render()
  })
  provider.on('status', render)
  provider.on('sync', render)
  provider.on('closed', (event) => {
    closed = event
    render()
  })
  render()
}
