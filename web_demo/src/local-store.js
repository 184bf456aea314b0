// IndexedDB persistence plus a "saved locally" indicator: after each change we queue a read-only
// IndexedDB transaction behind y-indexeddb's write; when it completes, the change is on disk.
import { IndexeddbPersistence } from 'y-indexeddb'

function afterPendingWrites (db) {
  return new Promise((resolve, reject) => {
    const tx = db.transaction(['updates'], 'readonly')
    tx.objectStore('updates').count()
    tx.oncomplete = resolve
    tx.onerror = tx.onabort = () => reject(tx.error)
  })
}

/**
 * Persist `doc` as `name` in IndexedDB; `indicator` shows data-state loading|saving|saved|error|cleared.
 * Returns `forget()`, which deletes the local copy and stops saving (the document was deleted on the server: a
 * copy kept here would be uploaded again on the next visit), `resume()`, which saves it again from now on (the
 * user went online anyway, starting the document again), and `persistence()`, the current one.
 */
export function persistLocally (name, doc, indicator) {
  let persistence
  let pending = 0
  let forgotten = false
  const show = (state, text) => {
    indicator.dataset.state = state
    indicator.textContent = text
  }
  const start = () => {
    persistence = new IndexeddbPersistence(name, doc) // stores the whole document once it has loaded
    show('loading', 'Loading local copy…')
    persistence.whenSynced.then(() => { if (pending === 0 && !forgotten) show('saved', 'Saved locally') })
  }
  start()

  const forget = async () => {
    if (forgotten) return
    forgotten = true
    await persistence.clearData()
    show('cleared', 'Local copy deleted')
  }
  const resume = () => {
    if (!forgotten) return
    forgotten = false
    pending = 0
    start()
  }

  // registered after y-indexeddb's own handler, so our read-only transaction queues behind its write
  doc.on('update', (_update, origin) => {
    if (origin === persistence || forgotten) return
    pending++
    show('saving', 'Saving locally…')
    persistence.whenSynced
      .then(() => afterPendingWrites(persistence.db))
      .then(() => { if (--pending === 0 && !forgotten) show('saved', 'Saved locally') },
        (err) => { pending--; if (!forgotten) show('error', `Local save failed: ${err}`) })
  })
  return { forget, resume, persistence: () => persistence }
}
