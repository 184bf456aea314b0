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

/** Persist `doc` as `name` in IndexedDB; `indicator` shows data-state loading|saving|saved|error. */
export function persistLocally (name, doc, indicator) {
  const persistence = new IndexeddbPersistence(name, doc)
  let pending = 0
  const show = (state, text) => {
    indicator.dataset.state = state
    indicator.textContent = text
  }
  show('loading', 'Loading local copy…')
  persistence.whenSynced.then(() => { if (pending === 0) show('saved', 'Saved locally') })

  // registered after y-indexeddb's own handler, so our read-only transaction queues behind its write
  doc.on('update', (_update, origin) => {
    if (origin === persistence) return
    pending++
    show('saving', 'Saving locally…')
    persistence.whenSynced
      .then(() => afterPendingWrites(persistence.db))
      .then(() => { if (--pending === 0) show('saved', 'Saved locally') },
        (err) => { pending--; show('error', `Local save failed: ${err}`) })
  })
  return persistence
}
