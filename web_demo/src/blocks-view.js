// The block list: each block's text (bound to its Y.Text) and its indexing list with statuses.
// All reads and writes of the block model go through model.js. Any client can write any shape into the
// document, so what is not shaped as model.js describes is skipped, and only strings become text.
import * as Y from 'yjs'
import {
  STATUS_PRIORITY, addIndexEntry, blocksMap, createBlock, entries, entryStatus, getBlock, setStatus
} from './model.js'
import { bindTextarea } from './text-binding.js'

const STATUSES = Object.keys(STATUS_PRIORITY).sort((a, b) => STATUS_PRIORITY[a] - STATUS_PRIORITY[b])
const STATUS_LABELS = { notStarted: 'not started', processing: 'processing', done: 'done', error: 'error' }
const statusLabel = (status) => (Object.hasOwn(STATUS_LABELS, status) ? STATUS_LABELS[status] : status)
const text = (value) => (typeof value === 'string' ? value : '')

/** `h('li.row', {dataset: {...}}, child, ...)`: a tiny element builder. */
function h (tagAndClass, props = {}, ...children) {
  const [tag, ...classes] = tagAndClass.split('.')
  const el = document.createElement(tag)
  if (classes.length) el.className = classes.join(' ')
  const { dataset, ...rest } = props
  Object.assign(el, rest)
  Object.assign(el.dataset, dataset)
  el.append(...children.filter((c) => c != null))
  return el
}

/** Ids sort by creation time, so blocks keep a stable order on every client. */
export const newBlockId = () =>
  `b-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 6)}`

export function addBlock (doc, type) {
  return createBlock(doc, newBlockId(), type, '')
}

function indexEntryRow (doc, blockId, entry) {
  const name = entry.get('index_name')
  const status = entryStatus(entry) ?? 'notStarted'
  const ts = entry.get('timestamp')
  const time = new Date(typeof ts === 'number' ? ts : NaN)
  const timed = !Number.isNaN(time.getTime())
  const buttons = STATUSES.map((s) => h('button.set-status', {
    type: 'button',
    textContent: statusLabel(s),
    title: `Set ${name} to ${s}`,
    ariaPressed: String(s === status),
    dataset: { testid: `set-status-${s}`, status: s },
    onclick: () => setStatus(doc, blockId, name, s)
  }))
  return h('li.index-entry', { dataset: { testid: 'index-entry', indexName: name, status } },
    h('span.index-name', { textContent: name }),
    h(`span.status.status-${status}`, {
      textContent: statusLabel(status),
      title: `resolved status (stored: ${text(entry.get('status')) || '–'})`,
      dataset: { testid: 'index-status' }
    }),
    h('time.timestamp', {
      textContent: timed ? time.toLocaleTimeString() : '',
      dateTime: timed ? time.toISOString() : ''
    }),
    h('span.status-buttons', {}, ...buttons))
}

function blockView (doc, blockId, block) {
  const content = block.get('content')
  const textarea = h('textarea.content', {
    rows: 3, placeholder: 'Type here…', ariaLabel: `Content of ${blockId}`, dataset: { testid: 'block-content' },
    disabled: !(content instanceof Y.Text)
  })
  const unbind = textarea.disabled ? () => {} : bindTextarea(textarea, content)

  const list = h('ul.index-list', { dataset: { testid: 'index-list' } })
  const indexingList = block.get('indexingList')
  const hasList = indexingList instanceof Y.Array
  const renderEntries = () => {
    const rows = entries(block).filter((entry) => typeof entry.get('index_name') === 'string')
      .map((entry) => indexEntryRow(doc, blockId, entry))
    list.replaceChildren(...(rows.length ? rows : [h('li.empty', { textContent: 'No indexes yet.' })]))
  }
  if (hasList) indexingList.observeDeep(renderEntries)
  renderEntries()

  const nameInput = h('input.index-name-input', {
    placeholder: 'index name, e.g. search', required: true, dataset: { testid: 'index-name-input' }
  })
  const form = h('form.add-index', {
    onsubmit: (event) => {
      event.preventDefault()
      const indexName = nameInput.value.trim()
      if (!indexName) return
      addIndexEntry(doc, blockId, indexName)
      nameInput.value = ''
    }
  }, nameInput, h('button', { type: 'submit', textContent: 'Add index', dataset: { testid: 'add-index' } }))

  const el = h('article.block', { dataset: { testid: 'block', blockId } },
    h('header.block-header', {},
      h('span.block-type', { textContent: text(block.get('type')) }),
      h('code.block-id', { textContent: blockId })),
    textarea,
    h('section.indexing', {}, h('h3', { textContent: 'Indexing' }), list, hasList ? form : null))

  return {
    el,
    block,
    destroy: () => {
      unbind()
      if (hasList) indexingList.unobserveDeep(renderEntries)
      el.remove()
    }
  }
}

/** Render all blocks of `doc` into `container`, keeping each block's DOM (and focus) across updates. */
export function mountBlocks (doc, container) {
  const blocks = blocksMap(doc)
  const views = new Map()
  const empty = h('p.empty', { textContent: 'No blocks yet. Add one above.', dataset: { testid: 'no-blocks' } })

  const render = () => {
    for (const [id, view] of views) {
      // gone, or replaced by a concurrent createBlock with the same id
      if (blocks.get(id) !== view.block) {
        view.destroy()
        views.delete(id)
      }
    }
    const ids = [...blocks.keys()].filter((id) => getBlock(doc, id)).sort()
    ids.forEach((id, position) => {
      if (!views.has(id)) views.set(id, blockView(doc, id, getBlock(doc, id)))
      const el = views.get(id).el
      if (container.children[position] !== el) container.insertBefore(el, container.children[position] ?? null)
    })
    if (ids.length === 0) container.replaceChildren(empty)
    else empty.remove()
  }
  blocks.observe(render)
  render()
}
