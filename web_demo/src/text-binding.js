// Two-way binding between a <textarea> and a Y.Text.
// Local edits become one minimal delete+insert (so concurrent typing elsewhere merges);
// remote edits rewrite the textarea and move the caret/selection through the change.

/**
 * The single replace turning `before` into `after`: remove `remove` chars at `index`, then insert `insert`.
 * `caret` (the caret after the edit) breaks ties when the edit is ambiguous, e.g. typing "a" into "aa".
 */
export function diff (before, after, caret = after.length) {
  const grown = Math.max(0, after.length - before.length)
  let prefix = 0
  const maxPrefix = Math.min(before.length, after.length, Math.max(0, caret - grown))
  while (prefix < maxPrefix && before[prefix] === after[prefix]) prefix++
  // never split a UTF-16 surrogate pair
  if (prefix > 0 && isHighSurrogate(before.charCodeAt(prefix - 1))) prefix--
  let suffix = 0
  const maxSuffix = Math.min(before.length, after.length) - prefix
  while (suffix < maxSuffix && before[before.length - 1 - suffix] === after[after.length - 1 - suffix]) suffix++
  if (suffix > 0 && isLowSurrogate(before.charCodeAt(before.length - suffix))) suffix--
  return { index: prefix, remove: before.length - prefix - suffix, insert: after.slice(prefix, after.length - suffix) }
}

const isHighSurrogate = (code) => code >= 0xd800 && code <= 0xdbff
const isLowSurrogate = (code) => code >= 0xdc00 && code <= 0xdfff

/** Where position `pos` of the old text ends up after a Y.Text delta (inserts exactly at `pos` stay after it). */
export function transformPosition (pos, delta) {
  let oldIndex = 0
  let result = pos
  for (const op of delta) {
    if (oldIndex >= pos) break
    if (op.retain) {
      oldIndex += op.retain
    } else if (op.insert) {
      result += typeof op.insert === 'string' ? op.insert.length : 1
    } else if (op.delete) {
      result -= Math.min(op.delete, pos - oldIndex)
      oldIndex += op.delete
    }
  }
  return result
}

/** Bind `textarea` to `ytext`; returns an unbind function. */
export function bindTextarea (textarea, ytext) {
  const origin = { binding: 'textarea' }
  textarea.value = ytext.toString()

  const onInput = () => {
    const { index, remove, insert } = diff(ytext.toString(), textarea.value, textarea.selectionEnd)
    if (remove === 0 && insert === '') return
    ytext.doc.transact(() => {
      if (remove > 0) ytext.delete(index, remove)
      if (insert) ytext.insert(index, insert)
    }, origin)
  }

  const onChange = (event) => {
    if (event.transaction.origin === origin) return
    const focused = document.activeElement === textarea
    const { selectionStart, selectionEnd, selectionDirection } = textarea
    textarea.value = ytext.toString()
    if (focused) {
      textarea.setSelectionRange(
        transformPosition(selectionStart, event.delta),
        transformPosition(selectionEnd, event.delta),
        selectionDirection
      )
    }
  }

  textarea.addEventListener('input', onInput)
  ytext.observe(onChange)
  return () => {
    textarea.removeEventListener('input', onInput)
    ytext.unobserve(onChange)
  }
}
