// Runs the browser tests (and the client's unit tests) with node's test runner and prints
// one closing line: `browser: N passed, N failed` (`, N skipped` when some were skipped).
//   node run.mjs [files...]        default: unit.test.mjs upload.test.mjs
import { run } from 'node:test';
import { spec } from 'node:test/reporters';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const files = (process.argv.slice(2).length ? process.argv.slice(2) : ['unit.test.mjs', 'upload.test.mjs'])
  .map((f) => path.resolve(here, f));

let passed = 0;
let failed = 0;
let skipped = 0;
const stream = run({ files, concurrency: 1, timeout: 30 * 60 * 1000 });
stream.on('test:pass', (e) => {
  if (e.details?.type === 'suite') return;
  if (e.skip || e.todo) skipped++;
  else passed++;
});
stream.on('test:fail', (e) => {
  if (e.details?.type === 'suite') return;
  // a file that fails to load reports itself as a failing test too
  failed++;
});
const out = stream.compose(spec);
out.pipe(process.stdout, { end: false });
out.on('end', () => {
  process.stdout.write(`\nbrowser: ${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}\n`);
  process.exitCode = failed ? 1 : 0;
});
