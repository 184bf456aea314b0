// Saved versions of the room's document, through the server's HTTP API: save one, list them, restore one.
// A restore is a change the server makes and broadcasts, so it reaches this page (and everyone else) over
// the websocket like any other edit; the server saves the state before it first, so a restore can be undone.

import { withToken } from './access.js'

const api = (room, rest = '') => `/api/docs/${encodeURIComponent(room)}/versions${rest}`

async function call (url, token, options = {}) {
  const response = await fetch(url, withToken(token, options))
  const body = await response.json().catch(() => ({}))
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`)
  return body
}

const when = (seconds) => new Date(seconds * 1000).toLocaleTimeString()

/**
 * Wire the versions panel: `form` (a label input and a save button), `list`, `message`. `token` (or null) goes
 * with every call; with `readOnly` the list is shown but nothing can be saved or restored.
 */
export function bindVersions (room, { token, readOnly }, { form, label, list, message }) {
  form.querySelector('fieldset').disabled = readOnly
  const say = (text, state = 'info') => {
    message.textContent = text
    message.dataset.state = state
  }

  const render = (versions) => {
    list.replaceChildren(...versions.slice().reverse().map((version) => {
      const item = document.createElement('li')
      item.dataset.testid = 'version'
      item.dataset.versionId = version.id
      item.dataset.label = version.label
      const name = document.createElement('span')
      name.className = 'version-label'
      name.textContent = `${version.label || `#${version.id}`} · ${when(version.time)}`
      name.title = name.textContent
      const restore = document.createElement('button')
      restore.type = 'button'
      restore.textContent = 'Restore'
      restore.dataset.testid = 'restore-version'
      restore.disabled = readOnly
      restore.addEventListener('click', async () => {
        try {
          await call(api(room, `/${version.id}/restore`), token, { method: 'POST' })
          say(`Restored ${version.label || `#${version.id}`}`, 'ok')
          await refresh()
        } catch (error) {
          say(`Restore failed: ${error.message}`, 'error')
        }
      })
      item.append(name, restore)
      return item
    }))
  }

  const refresh = async () => {
    try {
      render((await call(api(room), token)).versions)
    } catch (error) {
      render([])
      say(error.message === 'no such document' ? 'No versions yet' : `Versions unavailable: ${error.message}`)
    }
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault()
    try {
      const saved = await call(api(room), token, {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ label: label.value })
      })
      label.value = ''
      say(`Saved ${saved.label || `#${saved.id}`}`, 'ok')
      await refresh()
    } catch (error) {
      say(error.message === 'no such document' ? 'Nothing to save yet: the document is empty'
        : `Save failed: ${error.message}`, 'error')
    }
  })
  return refresh
}
