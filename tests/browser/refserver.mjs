// Stand-in for `python -m collab_server serve`, for working on the demo without it: serves
// web_demo/dist/ at / , GET /health, and y-websocket rooms at ws://host:port/<room> using the
// reference Node server (@y/websocket-server, in memory). Usage: PORT=1234 (0: any free port) node tests/browser/refserver.mjs
import http from 'node:http'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { WebSocketServer } from 'ws'
import { setupWSConnection } from '@y/websocket-server/utils'

const dist = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../web_demo/dist')
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.map': 'application/json' }
const host = process.env.HOST || '127.0.0.1'
const port = Number(process.env.PORT || 1234)

const server = http.createServer(async (req, res) => {
  const { pathname } = new URL(req.url, 'http://x')
  if (pathname === '/health') return res.end('ok')
  const file = path.join(dist, pathname === '/' ? 'index.html' : path.normalize(pathname))
  try {
    if (!file.startsWith(dist)) throw new Error('outside dist')
    const body = await readFile(file)
    res.writeHead(200, { 'Content-Type': TYPES[path.extname(file)] ?? 'application/octet-stream' })
    res.end(body)
  } catch {
    res.writeHead(404).end('not found')
  }
})
const wss = new WebSocketServer({ server })
wss.on('connection', (conn, req) => setupWSConnection(conn, req, { docName: decodeURIComponent(req.url.slice(1).split('?')[0]) }))
server.listen(port, host, () => console.log(`reference server on http://${host}:${server.address().port}`))
