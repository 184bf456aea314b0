// Who is here: our own name/colour in awareness (kept in localStorage), everyone's in a list.

const USER_KEY = 'collab-demo:user'
const COLORS = ['#e11d48', '#ea580c', '#ca8a04', '#16a34a', '#0891b2', '#2563eb', '#7c3aed', '#db2777']
const NAMES = ['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara', 'Donald', 'Radia', 'Ken']

const pick = (list) => list[Math.floor(Math.random() * list.length)]

function loadUser () {
  try {
    const user = JSON.parse(localStorage.getItem(USER_KEY))
    if (user && user.name && user.color) return user
  } catch {}
  const user = { name: pick(NAMES), color: pick(COLORS) }
  localStorage.setItem(USER_KEY, JSON.stringify(user))
  return user
}

/** Publish our user in awareness, let `nameInput` rename it, and render everyone into `list`. */
export function bindPresence (awareness, { list, nameInput }) {
  let user = loadUser()
  awareness.setLocalStateField('user', user)
  nameInput.value = user.name
  nameInput.addEventListener('change', () => {
    // a new object: awareness compares states deeply against the previous one, so mutating would be a no-op
    user = { ...user, name: nameInput.value.trim() || user.name }
    nameInput.value = user.name
    localStorage.setItem(USER_KEY, JSON.stringify(user))
    awareness.setLocalStateField('user', user)
  })

  const render = () => {
    const items = []
    for (const [clientId, state] of awareness.getStates()) {
      if (!state.user) continue
      const li = document.createElement('li')
      li.dataset.testid = 'presence-user'
      li.dataset.clientId = String(clientId)
      const dot = document.createElement('span')
      dot.className = 'dot'
      dot.style.background = state.user.color
      li.append(dot, state.user.name)
      if (clientId === awareness.clientID) {
        li.classList.add('me')
        li.append(' (you)')
      }
      items.push(li)
    }
    list.replaceChildren(...items)
  }
  awareness.on('change', render)
  render()
}

/**
 * Keep presence right across reconnects (yjs/y-websocket#122): peers and the server drop a disconnected
 * client's state but remember its clock, and ignore a state re-sent with that same clock.
 */
export function refreshPresenceOnReconnect (provider) {
  const { awareness } = provider
  provider.on('status', ({ status }) => {
    if (status === 'connected') {
      // tick our clock so everyone accepts our state again
      awareness.setLocalState(awareness.getLocalState())
    } else if (status === 'disconnected') {
      // the provider just removed everyone else; forget their clocks so their states are accepted on reconnect
      for (const clientId of [...awareness.meta.keys()]) {
        if (clientId !== awareness.clientID) awareness.meta.delete(clientId)
      }
    }
  })
}
