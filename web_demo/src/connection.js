// Connection indicator and the "work offline" toggle. The toggle is kept in localStorage,
// so a page reloaded while offline stays offline (its edits live in IndexedDB meanwhile).

const OFFLINE_KEY = 'collab-demo:offline'

export const offlinePreferred = () => localStorage.getItem(OFFLINE_KEY) === '1'

/** [state, label]: state is 'online' (connected and synced), 'syncing' (connecting or catching up) or 'offline'. */
export function connectionState (provider) {
  if (provider.wsconnected) return provider.synced ? ['online', 'Online'] : ['syncing', 'Syncing…']
  if (provider.shouldConnect) return ['syncing', 'Connecting…']
  return ['offline', 'Offline']
}

/** Wire the indicator element and the offline checkbox to the provider. */
export function bindConnection (provider, { indicator, toggle }) {
  const render = () => {
    const [state, label] = connectionState(provider)
    indicator.dataset.state = state
    indicator.textContent = label
    toggle.checked = !provider.shouldConnect
  }
  toggle.addEventListener('change', () => {
    localStorage.setItem(OFFLINE_KEY, toggle.checked ? '1' : '0')
    if (toggle.checked) provider.disconnect()
    else provider.connect()
    render()
  })
  provider.on('status', render)
  provider.on('sync', render)
  render()
}
