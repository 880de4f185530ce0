// Prints the size of the built client: every dist/*.js file, raw and gzipped
// (level 9), and all of them concatenated into one gzip stream (what a page
// that loads the whole client transfers, give or take the module wrappers).
// Run after `npm run build`. No minifier is involved: the numbers are for
// tsc's output with comments removed.
import { readdirSync, readFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const dist = join(dirname(fileURLToPath(import.meta.url)), '..', 'dist');

export function measure() {
  const files = readdirSync(dist).filter((f) => f.endsWith('.js')).sort();
  const rows = files.map((f) => {
    const b = readFileSync(join(dist, f));
    return { file: f, bytes: b.length, gzip: gzipSync(b, { level: 9 }).length };
  });
  const all = Buffer.concat(files.map((f) => readFileSync(join(dist, f))));
  return { rows, bytes: all.length, gzip: gzipSync(all, { level: 9 }).length };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { rows, bytes, gzip } = measure();
  for (const r of rows) console.log(`${r.file.padEnd(20)} ${String(r.bytes).padStart(6)} B  ${String(r.gzip).padStart(5)} B gzip`);
  console.log(`${'all, concatenated'.padEnd(20)} ${String(bytes).padStart(6)} B  ${String(gzip).padStart(5)} B gzip`);
}
