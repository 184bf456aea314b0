// Bundle the web demo: web_demo/src/main.js -> web_demo/dist/app.js, plus index.html and style.css.
// Usage: node web_demo/build.mjs  (npm run build:demo, make demo)
import { build } from 'esbuild'
import { copyFile, mkdir, rm } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import path from 'node:path'

const here = path.dirname(fileURLToPath(import.meta.url))
const dist = path.join(here, 'dist')

await rm(dist, { recursive: true, force: true })
await mkdir(dist, { recursive: true })
await build({
  entryPoints: [path.join(here, 'src', 'main.js')],
  outfile: path.join(dist, 'app.js'),
  bundle: true,
  format: 'esm',
  target: 'es2020',
  minify: true,
  sourcemap: true,
  logLevel: 'warning'
})
await copyFile(path.join(here, 'index.html'), path.join(dist, 'index.html'))
await copyFile(path.join(here, 'src', 'style.css'), path.join(dist, 'style.css'))
console.log(`built ${path.relative(process.cwd(), dist)}/`)
