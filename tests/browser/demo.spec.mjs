// Drives the web demo in real headless Chromium (two browser contexts = two users).
// Usage: node tests/browser/demo.spec.mjs <server http url> [scenario ...]
// Prints one line per scenario, exits 1 if any failed. Screenshots go to test-artifacts/browser/<scenario>/.
import assert from 'node:assert/strict'
import { mkdir, rm } from 'node:fs/promises'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium } from 'playwright-core'

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..')
const ARTIFACTS = path.join(ROOT, 'test-artifacts', 'browser')
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium'
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic']
const TIMEOUT = 10_000

const [baseUrl, ...only] = process.argv.slice(2)
if (!baseUrl) {
  console.error('usage: node tests/browser/demo.spec.mjs <server http url> [scenario ...]')
  process.exit(2)
}

// ---- page helpers -------------------------------------------------------------------------------

const byTestId = (id) => `[data-testid="${id}"]`
const blockSel = (blockId) => `[data-testid="block"][data-block-id="${blockId}"]`
const contentSel = (blockId) => `${blockSel(blockId)} ${byTestId('block-content')}`
const entrySel = (blockId, indexName) => `${blockSel(blockId)} [data-testid="index-entry"][data-index-name="${indexName}"]`

const newRoom = (name) => `${name}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 6)}`

/** A user: own browser context (own IndexedDB/localStorage), one page on `room` (with `token`, if given). */
async function openUser (browser, room, name, errors, token = null) {
  // a test server's certificate comes from a throw-away authority (Node's own fetches get NODE_EXTRA_CA_CERTS)
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 }, ignoreHTTPSErrors: baseUrl.startsWith('https:') })
  const page = await context.newPage()
  page.setDefaultTimeout(TIMEOUT)
  page.on('pageerror', (err) => errors.push(`${name}: ${err.message}`))
  page.on('console', (msg) => { if (msg.type() === 'error') console.log(`  [${name} console] ${msg.text()}`) })
  await page.goto(`${baseUrl}/?room=${encodeURIComponent(room)}${token ? `&token=${token}` : ''}`)
  await page.fill(byTestId('user-name'), name)
  await page.press(byTestId('user-name'), 'Enter')
  await waitConnection(page, 'online')
  return { name, context, page }
}

/** Alice and Bob in a new room, where Alice added a block with `text` and Bob sees it. */
async function twoUsersSharingABlock (browser, roomPrefix, text, errors) {
  const room = newRoom(roomPrefix)
  const alice = await openUser(browser, room, 'Alice', errors)
  const bob = await openUser(browser, room, 'Bob', errors)
  const blockId = await addBlock(alice, text)
  await waitForContent(bob, blockId, text)
  return { room, alice, bob, blockId }
}

const waitConnection = (page, state) =>
  page.waitForSelector(`${byTestId('connection-status')}[data-state="${state}"]`)

async function setOffline (user, offline) {
  await user.page.setChecked(byTestId('offline-toggle'), offline)
  await waitConnection(user.page, offline ? 'offline' : 'online')
}

/** Wait until the block's textarea holds exactly `expected`; the error says what it held instead. */
async function waitForContent (user, blockId, expected) {
  try {
    await user.page.waitForFunction(([sel, want]) => document.querySelector(sel)?.value === want,
      [contentSel(blockId), expected], { timeout: TIMEOUT })
  } catch {
    const actual = await user.page.$eval(contentSel(blockId), (el) => el.value).catch(() => '<no block>')
    assert.fail(`${user.name}: block ${blockId} content ${JSON.stringify(actual)}, want ${JSON.stringify(expected)}`)
  }
}

async function waitForStatus (user, blockId, indexName, status) {
  const sel = entrySel(blockId, indexName)
  try {
    await user.page.waitForSelector(`${sel}[data-status="${status}"] [data-testid="index-status"]`)
  } catch {
    const actual = await user.page.$eval(sel, (el) => el.dataset.status).catch(() => '<no entry>')
    assert.fail(`${user.name}: ${indexName} status ${actual}, want ${status}`)
  }
}

/** Wait until IndexedDB holds everything typed so far (safe to reload). */
const waitSavedLocally = (user) => user.page.waitForSelector(`${byTestId('local-save')}[data-state="saved"]`)

async function waitPresence (user, names) {
  const want = [...names].sort().join(', ')
  const shown = () => [...document.querySelectorAll('[data-testid="presence-user"]')]
    .map((li) => li.textContent.replace(' (you)', '')).sort().join(', ')
  try {
    await user.page.waitForFunction(`(${shown})() === ${JSON.stringify(want)}`, null, { timeout: TIMEOUT })
  } catch {
    assert.fail(`${user.name}: presence shows [${await user.page.evaluate(shown)}], want [${want}]`)
  }
}

async function addBlock (user, text) {
  const before = await user.page.$$eval(byTestId('block'), (els) => els.map((el) => el.dataset.blockId))
  await user.page.click(byTestId('add-block'))
  const handle = await user.page.waitForFunction((before) =>
    [...document.querySelectorAll('[data-testid="block"]')].map((el) => el.dataset.blockId)
      .find((id) => !before.includes(id)), before, { timeout: TIMEOUT })
  const blockId = await handle.jsonValue()
  await user.page.locator(contentSel(blockId)).pressSequentially(text)
  return blockId
}

async function typeAt (user, blockId, key, text) {
  const textarea = user.page.locator(contentSel(blockId))
  await textarea.click()
  await textarea.press(key)
  await textarea.pressSequentially(text, { delay: 15 })
}

async function addIndex (user, blockId, indexName) {
  await user.page.fill(`${blockSel(blockId)} ${byTestId('index-name-input')}`, indexName)
  await user.page.click(`${blockSel(blockId)} ${byTestId('add-index')}`)
}

const setStatus = (user, blockId, indexName, status) =>
  user.page.click(`${entrySel(blockId, indexName)} ${byTestId(`set-status-${status}`)}`)

let shots = 0
let running = '' // the scenario being run: its screenshots go to ARTIFACTS/<running>/
async function screenshot (users, scenario, step) {
  const n = String(++shots).padStart(2, '0')
  await Promise.all(users.map((u) => u.page.screenshot({
    path: path.join(ARTIFACTS, running, `${n}-${scenario}-${step}-${u.name}.png`),
    fullPage: true
  })))
}

// ---- scenarios ----------------------------------------------------------------------------------

const scenarios = {
  async 'concurrent-typing' (browser, errors) {
    const room = newRoom('typing')
    const alice = await openUser(browser, room, 'Alice', errors)
    const bob = await openUser(browser, room, 'Bob', errors)
    await Promise.all([waitPresence(alice, ['Alice', 'Bob']), waitPresence(bob, ['Alice', 'Bob'])])

    const blockId = await addBlock(alice, 'hello world')
    await waitForContent(bob, blockId, 'hello world')

    // both type at the same time, at opposite ends of the same text
    await Promise.all([
      typeAt(alice, blockId, 'Home', 'Alice says: '),
      typeAt(bob, blockId, 'End', ' -- and Bob agrees')
    ])
    const merged = 'Alice says: hello world -- and Bob agrees'
    await Promise.all([waitForContent(alice, blockId, merged), waitForContent(bob, blockId, merged)])

    // and in the middle, interleaved with the other's caret moving under it
    await Promise.all([
      typeAt(alice, blockId, 'End', '!'),
      (async () => {
        await bob.page.locator(contentSel(blockId)).click()
        await bob.page.locator(contentSel(blockId)).evaluate((el) => el.setSelectionRange(17, 17)) // after "hello"
        await bob.page.locator(contentSel(blockId)).pressSequentially(', brave new', { delay: 15 })
      })()
    ])
    const final = 'Alice says: hello, brave new world -- and Bob agrees!'
    await Promise.all([waitForContent(alice, blockId, final), waitForContent(bob, blockId, final)])
    await screenshot([alice, bob], 'typing', 'converged')
  },

  async 'offline-reload' (browser, errors) {
    const { alice, bob, blockId } = await twoUsersSharingABlock(browser, 'offline', 'shared text', errors)

    await setOffline(alice, true)
    await waitPresence(bob, ['Bob'])
    await typeAt(alice, blockId, 'End', ' +written offline')
    await typeAt(bob, blockId, 'Home', 'Bob online: ')
    await waitSavedLocally(alice)
    await screenshot([alice, bob], 'offline', 'diverged')

    // reload while offline: still offline, the offline edit comes back from IndexedDB
    await alice.page.reload()
    await waitConnection(alice.page, 'offline')
    assert.equal(await alice.page.isChecked(byTestId('offline-toggle')), true, 'offline toggle survives reload')
    await waitForContent(alice, blockId, 'shared text +written offline')
    await screenshot([alice], 'offline', 'reloaded')
    // working offline is a choice for this room: another room opened meanwhile in the same browser is online
    const elsewhere = await alice.context.newPage()
    await elsewhere.goto(`${baseUrl}/?room=${encodeURIComponent(newRoom('elsewhere'))}`)
    await waitConnection(elsewhere, 'online')
    await elsewhere.close()

    await setOffline(alice, false)
    const merged = 'Bob online: shared text +written offline'
    await Promise.all([waitForContent(alice, blockId, merged), waitForContent(bob, blockId, merged)])
    await Promise.all([waitPresence(alice, ['Alice', 'Bob']), waitPresence(bob, ['Alice', 'Bob'])])
    await screenshot([alice, bob], 'offline', 'converged')
  },

  async 'presence-reconnect' (browser, errors) {
    const room = newRoom('presence')
    const alice = await openUser(browser, room, 'Alice', errors)
    const bob = await openUser(browser, room, 'Bob', errors)
    await Promise.all([waitPresence(alice, ['Alice', 'Bob']), waitPresence(bob, ['Alice', 'Bob'])])

    // one side reconnects, then both at once: each time everyone must see everyone again
    await setOffline(alice, true)
    await Promise.all([waitPresence(alice, ['Alice']), waitPresence(bob, ['Bob'])])
    await setOffline(alice, false)
    await Promise.all([waitPresence(alice, ['Alice', 'Bob']), waitPresence(bob, ['Alice', 'Bob'])])
    await Promise.all([setOffline(alice, true), setOffline(bob, true)])
    await Promise.all([setOffline(alice, false), setOffline(bob, false)])
    await Promise.all([waitPresence(alice, ['Alice', 'Bob']), waitPresence(bob, ['Alice', 'Bob'])])

    // a rename shows up at the other side
    await alice.page.fill(byTestId('user-name'), 'Alice B.')
    await alice.page.press(byTestId('user-name'), 'Enter')
    await waitPresence(bob, ['Alice B.', 'Bob'])
    await screenshot([alice, bob], 'presence', 'renamed')
  },

  async 'status-conflict' (browser, errors) {
    const { alice, bob, blockId } = await twoUsersSharingABlock(browser, 'status', 'a block to index', errors)
    await addIndex(alice, blockId, 'search')
    await waitForStatus(bob, blockId, 'search', 'notStarted')

    await Promise.all([setOffline(alice, true), setOffline(bob, true)])
    await setStatus(alice, blockId, 'search', 'done')
    await setStatus(bob, blockId, 'search', 'error')
    await Promise.all([waitForStatus(alice, blockId, 'search', 'done'), waitForStatus(bob, blockId, 'search', 'error')])
    await screenshot([alice, bob], 'status', 'offline-conflict')

    await Promise.all([setOffline(alice, false), setOffline(bob, false)])
    await Promise.all([waitForStatus(alice, blockId, 'search', 'error'), waitForStatus(bob, blockId, 'search', 'error')])
    await Promise.all([waitPresence(alice, ['Alice', 'Bob']), waitPresence(bob, ['Alice', 'Bob'])])
    await screenshot([alice, bob], 'status', 'resolved')

    // a causally later write wins even with lower priority
    await setStatus(alice, blockId, 'search', 'processing')
    await Promise.all([waitForStatus(alice, blockId, 'search', 'processing'),
      waitForStatus(bob, blockId, 'search', 'processing')])

    // every status colour at once, for the screenshot
    await addIndex(bob, blockId, 'embeddings')
    await setStatus(bob, blockId, 'embeddings', 'done')
    await addIndex(bob, blockId, 'summary')
    await waitForStatus(alice, blockId, 'summary', 'notStarted')
    await waitForStatus(alice, blockId, 'embeddings', 'done')
    await alice.page.click('details.json summary')
    await screenshot([alice], 'status', 'overview')
  },

  async 'versions' (browser, errors) {
    const { alice, bob, blockId } = await twoUsersSharingABlock(browser, 'versions', 'first draft', errors)
    const versions = (user) => user.page.$$eval(byTestId('version'), (els) => els.map((el) => el.dataset.label))
    await alice.page.click(`${byTestId('versions')} summary`)
    await alice.page.fill(byTestId('version-label'), 'v1')
    await alice.page.click(byTestId('save-version'))
    await alice.page.waitForSelector(`${byTestId('version')}[data-label="v1"]`)

    await typeAt(alice, blockId, 'End', ', then rewritten')
    await waitForContent(bob, blockId, 'first draft, then rewritten')
    await alice.page.click(`${byTestId('version')}[data-label="v1"] ${byTestId('restore-version')}`)
    // the server's restore reaches both pages over the websocket
    await Promise.all([waitForContent(alice, blockId, 'first draft'), waitForContent(bob, blockId, 'first draft')])
    await alice.page.waitForSelector(`${byTestId('version')}[data-label^="before restoring version"]`)
    assert.deepEqual((await versions(alice)).length, 2)
    await screenshot([alice, bob], 'versions', 'restored')

    // and the restore is undone from the version saved before it
    await alice.page.click(`${byTestId('version')}[data-label^="before restoring"] ${byTestId('restore-version')}`)
    await Promise.all([waitForContent(alice, blockId, 'first draft, then rewritten'),
      waitForContent(bob, blockId, 'first draft, then rewritten')])
  },

  async 'read-only' (browser, errors) {
    const [rw, ro] = [process.env.RW_TOKEN, process.env.RO_TOKEN]
    assert.ok(rw && ro, 'needs RW_TOKEN and RO_TOKEN for a server run with --auth-required')
    const room = newRoom('read-only')
    const alice = await openUser(browser, room, 'Alice', errors, rw)
    const blockId = await addBlock(alice, 'written by Alice')
    const bob = await openUser(browser, room, 'Bob', errors, ro)
    await waitForContent(bob, blockId, 'written by Alice')
    await bob.page.waitForSelector(`${byTestId('access')}:text("Read-only")`)
    for (const sel of [contentSel(blockId), byTestId('add-block'), byTestId('save-version')]) {
      assert.ok(await bob.page.$eval(sel, (el) => el.matches(':disabled')), `a read-only page offers ${sel}`)
    }
    const api = `${baseUrl}/api/docs/${encodeURIComponent(room)}`
    const saved = await fetch(`${api}/versions`, { method: 'POST', headers: { Authorization: `Bearer ${rw}` } })
    assert.equal(saved.status, 201)
    await bob.page.click(`${byTestId('versions')} summary`)
    const restore = `${byTestId('version')} ${byTestId('restore-version')}`
    await bob.page.waitForSelector(restore)
    assert.ok(await bob.page.$eval(restore, (el) => el.matches(':disabled')), 'a read-only page offers restore')
    await screenshot([bob], 'read-only', 'viewer')

    // an edit made anyway (from the devtools console) is refused by the server: nobody else gets it
    await bob.page.evaluate((id) => window.collabDemo.doc.getMap('blocks').delete(id), blockId)
    await typeAt(alice, blockId, 'End', ', still here')
    const stored = await fetch(`${api}/json`, { headers: { Authorization: `Bearer ${rw}` } })
    assert.equal((await stored.json()).blocks[blockId]?.content, 'written by Alice, still here')
    await waitForContent(alice, blockId, 'written by Alice, still here')
  },

  async 'deleted' (browser, errors) {
    const { room, alice, bob } = await twoUsersSharingABlock(browser, 'deleted', 'soon gone', errors)
    await Promise.all([waitSavedLocally(alice), waitSavedLocally(bob)])

    const deleted = await fetch(`${baseUrl}/api/docs/${encodeURIComponent(room)}`, { method: 'DELETE' })
    assert.equal(deleted.status, 204)
    await Promise.all([waitConnection(alice.page, 'deleted'), waitConnection(bob.page, 'deleted')])
    const cleared = `${byTestId('local-save')}[data-state="cleared"]`
    await Promise.all([alice.page.waitForSelector(cleared), bob.page.waitForSelector(cleared)])
    await screenshot([alice, bob], 'deleted', 'closed')

    // the next visit starts from nothing: no local copy to upload, and nothing on the server
    await alice.page.reload()
    await waitConnection(alice.page, 'online')
    await alice.page.waitForSelector(`${byTestId('local-save')}[data-state="saved"]`)
    assert.equal(await alice.page.$$eval(byTestId('block'), (els) => els.length), 0, 'the deleted block came back')
    const after = await fetch(`${baseUrl}/api/docs/${encodeURIComponent(room)}/json`)
    assert.equal(after.status, 404, 'the document was uploaded again')

    // a tab opened later in Bob's browser: Bob's page, which still holds the document, left the tabs' channel
    const later = await bob.context.newPage()
    later.on('pageerror', (err) => errors.push(`Bob's new tab: ${err.message}`))
    await later.goto(`${baseUrl}/?room=${encodeURIComponent(room)}`)
    await waitConnection(later, 'online')
    await later.waitForSelector(`${byTestId('local-save')}[data-state="saved"]`)
    assert.equal(await later.$$eval(byTestId('block'), (els) => els.length), 0, 'a tab got the deleted block')
    await later.close()
    const still = await fetch(`${baseUrl}/api/docs/${encodeURIComponent(room)}/json`)
    assert.equal(still.status, 404, 'a new tab uploaded the document again')

    // Bob goes online anyway (the toggle shows him offline), starting the document again: his page saves it
    // locally again, offline edits too
    await setOffline(bob, false)
    await waitSavedLocally(bob)
    const blockId = await bob.page.$eval(byTestId('block'), (el) => el.dataset.blockId)
    await setOffline(bob, true)
    await typeAt(bob, blockId, 'End', ', kept offline')
    await waitSavedLocally(bob)
    await bob.page.reload()
    await waitConnection(bob.page, 'offline')
    await waitForContent(bob, blockId, 'soon gone, kept offline')
  },

  // a page on this server's origin edits a document on CORS_API (started with --cors-origins <this origin>);
  // a page on CORS_API's origin cannot edit one here (no --cors-origins): the browser stops it at the preflight
  async 'cross-origin-api' (browser, errors) {
    const other = process.env.CORS_API
    assert.ok(other, 'CORS_API (a server that lets this origin in) is not set')
    const room = newRoom('cors')
    const context = await browser.newContext()
    const page = await context.newPage()
    page.on('pageerror', (err) => errors.push(`page: ${err.message}`))
    const createBlock = (api) => page.evaluate(async ([api, room]) => {
      try {
        const res = await fetch(`${api}/api/docs/${encodeURIComponent(room)}/blocks`, {
          method: 'POST', // a JSON body makes this a request the browser checks with a preflight first
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ ops: [{ op: 'create_block', id: 'b1', type: 'paragraph', content: 'from elsewhere' }] })
        })
        return { status: res.status, body: await res.json() }
      } catch (err) {
        return { error: String(err) }
      }
    }, [api, room])

    await page.goto(`${baseUrl}/health`)
    const allowed = await createBlock(other)
    assert.equal(allowed.status, 200, JSON.stringify(allowed))
    assert.equal(allowed.body.blocks.b1.content, 'from elsewhere')
    const stored = await (await fetch(`${other}/api/docs/${encodeURIComponent(room)}/json`)).json()
    assert.equal(stored.blocks.b1.content, 'from elsewhere')

    await page.goto(`${other}/health`)
    const refused = await createBlock(baseUrl)
    assert.match(refused.error ?? '', /Failed to fetch/, JSON.stringify(refused))
    const here = await fetch(`${baseUrl}/api/docs/${encodeURIComponent(room)}/json`)
    assert.equal(here.status, 404, 'the refused request was applied anyway')
  }
}

// ---- runner -------------------------------------------------------------------------------------

const selected = only.length ? only : Object.keys(scenarios)
for (const name of selected) {
  if (!scenarios[name]) {
    console.error(`unknown scenario ${name}; known: ${Object.keys(scenarios).join(', ')}`)
    process.exit(2)
  }
}
// screenshots go to a directory per scenario, replaced when it runs again (the suite runs one scenario at a time)
for (const name of selected) {
  await rm(path.join(ARTIFACTS, name), { recursive: true, force: true })
  await mkdir(path.join(ARTIFACTS, name), { recursive: true })
}
const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS })
let failed = 0
for (const name of selected) {
  const errors = []
  const started = Date.now()
  const contextsBefore = new Set(browser.contexts())
  running = name
  try {
    await scenarios[name](browser, errors)
    assert.deepEqual(errors, [], 'uncaught page errors')
    console.log(`ok - ${name} (${Date.now() - started} ms)`)
  } catch (err) {
    failed++
    console.log(`not ok - ${name}: ${err.stack || err}`)
    for (const [i, context] of browser.contexts().filter((c) => !contextsBefore.has(c)).entries()) {
      for (const page of context.pages()) {
        await page.screenshot({ path: path.join(ARTIFACTS, name, `FAILED-${i}.png`), fullPage: true }).catch(() => {})
      }
    }
  } finally {
    for (const context of browser.contexts()) if (!contextsBefore.has(context)) await context.close()
  }
}
await browser.close()
console.log(`${selected.length - failed}/${selected.length} scenarios passed; screenshots in ${path.relative(ROOT, ARTIFACTS)}/`)
process.exit(failed ? 1 : 0)
