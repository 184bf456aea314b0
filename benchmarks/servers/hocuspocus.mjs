// Hocuspocus launcher for the benchmark: @hocuspocus/server + @hocuspocus/extension-sqlite, default
// batching/debounce settings (flushDelay 0, debounce 2 s, maxDebounce 10 s) so we measure it as shipped.
// Env: HOST, PORT, DB (SQLite file). Prints "listening <port>" once up. SIGTERM stores pending docs and exits.
import { Server } from '@hocuspocus/server'
import { SQLite } from '@hocuspocus/extension-sqlite'

const host = process.env.HOST || '127.0.0.1'
const port = Number(process.env.PORT || 1234)
const database = process.env.DB || ':memory:'

const server = new Server({
  name: 'bench-hocuspocus',
  address: host,
  port,
  quiet: true,
  stopOnSignals: true,
  extensions: [new SQLite({ database })],
  async onRequest ({ request, response }) {
    // /health → 200 so the orchestrator can poll readiness like for the other servers.
    if (request.url === '/health') {
      response.writeHead(200, { 'Content-Type': 'text/plain' })
      response.end('ok')
      // eslint-disable-next-line no-throw-literal
      throw null // stop the hook chain: the response is sent
    }
  }
})

await server.listen()
console.log(`listening ${port}`)
