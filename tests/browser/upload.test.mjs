// Browser tests of the demo page (php/demo) and the JS client (php/client) against a real
// nginx + php-fpm stack with the extension (UPLOAD_PROGRESS_EXT), one stack per test.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  skipReason, startStack, randomFile, sha256File, getJson, launchBrowser, openPage, recordRows,
  rowInfo, waitForState, waitFor, ensureArtifacts, MOCK,
} from './lib.mjs';

const SKIP = skipReason();
const MiB = 1024 * 1024;
const FILE_SIZE = Number(process.env.BROWSER_FILE_MB || 200) * MiB;
const CHUNK = 4 * MiB;
const TIMEOUT = 300_000;

let browser = null;
let file = null;

before(async () => {
  if (SKIP) return;
  file = randomFile(FILE_SIZE, 'random-200m.bin');
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close().catch(() => {});
  file?.cleanup();
});

function pageUrl(stack, params) {
  return `${stack.baseUrl}/?${new URLSearchParams({ chunk_size: String(CHUNK), parallel: '4', ...params })}`;
}

async function storedFileMatches(stack, id) {
  const st = await getJson(`${stack.baseUrl}/api/uploads/${id}`);
  assert.equal(st.status, 200, `GET /api/uploads/${id}: ${st.text}`);
  assert.equal(st.json.state, 'complete');
  // The server's path stays on the server: the file is where the storage layout puts it.
  assert.equal(st.json.path, undefined, 'no server path in JSON sent to browsers');
  const stored = path.join(stack.storageDir, id, 'data');
  assert.ok(fs.existsSync(stored), `stored file ${stored} exists`);
  assert.equal(fs.statSync(stored).size, file.size, 'stored size');
  assert.equal(sha256File(stored), file.sha256, 'sha256 of the stored file equals the source');
  return st.json;
}

async function withStack(name, fn) {
  const stack = await startStack(name);
  try {
    return await fn(stack);
  } catch (err) {
    err.message += `\n--- stack logs (${stack.runDir}) ---\n${stack.logTail()}`;
    throw err;
  } finally {
    await stack.stop();
  }
}

test('a 200 MB file picked on the page: progress rises through >= 10 values, stored file is identical', { skip: SKIP || false, timeout: TIMEOUT }, async (t) => {
  await withStack('progress', async (stack) => {
    const { page, errors, context } = await openPage(browser, pageUrl(stack, { chunk_delay_ms: process.env.BROWSER_CHUNK_DELAY_MS || '20' }));
    try {
      await recordRows(page);
      await page.setInputFiles('#file-input', file.path);
      await waitForState(page, 'complete', TIMEOUT - 30_000);
      const samples = await page.evaluate(() => window.__samples);
      const before = [];
      for (const s of samples) {
        if (s.state === 'complete') break;
        before.push(s.done);
      }
      const distinct = [...new Set(before)];
      assert.ok(distinct.length >= 10, `data-bytes-done took ${distinct.length} distinct values before complete: ${distinct.join(', ')}`);
      // rising: every later value at or above the first, ends at the total
      const row = await rowInfo(page);
      assert.equal(row.done, file.size, 'data-bytes-done ends at the file size');
      assert.equal(row.total, file.size, 'data-bytes-total is the file size');
      const sources = await page.evaluate(() => window.uploadDemo.progressSources);
      t.diagnostic(`distinct data-bytes-done values: ${distinct.length}; progress events by source: ${JSON.stringify(sources)}`);
      assert.ok((sources.socket ?? 0) > 0, `some progress came over the WebSocket: ${JSON.stringify(sources)}`);
      await storedFileMatches(stack, row.id);
      assert.deepEqual(errors, [], 'no uncaught page errors');
    } finally {
      await context.close();
    }
  });
});

test('kill -9 of the hub mid-upload: the upload still completes, no uncaught page error', { skip: SKIP || false, timeout: TIMEOUT }, async (t) => {
  await withStack('hubkill', async (stack) => {
    const { page, errors, context } = await openPage(browser, pageUrl(stack, { chunk_delay_ms: '120' }));
    try {
      await page.waitForSelector('#connection[data-socket-state="connected"]', { timeout: 20000 });
      await page.setInputFiles('#file-input', file.path);
      // mid-upload: some bytes done, far from the end
      await page.waitForFunction(() => {
        const r = document.querySelector('#uploads .upload');
        return r && r.dataset.uploadId && Number(r.dataset.bytesDone) > 0;
      }, null, { timeout: 60000, polling: 50 });
      const pids = await stack.hubPids();
      assert.ok(pids.length > 0, 'found the hub process');
      const mid = await rowInfo(page);
      for (const pid of pids) process.kill(pid, 'SIGKILL');
      const gone = (pid) => {
        try { return / [ZX] /.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\)/, ')')); } catch { return true; }
      };
      await waitFor(() => pids.every(gone), 5000, 'hub gone');
      assert.ok(mid.done < mid.total, `the upload was still running when the hub died (${mid.done}/${mid.total})`);
      await waitForState(page, 'complete', TIMEOUT - 60_000);
      const row = await rowInfo(page);
      assert.equal(row.done, file.size);
      await storedFileMatches(stack, row.id);
      if (!MOCK) {
        // The next request of a worker respawns a hub; the page reconnects on its own.
        const back = await page.waitForSelector('#connection[data-socket-state="connected"]', { timeout: 30000 }).then(() => true, () => false);
        t.diagnostic(`socket ${back ? 'reconnected to a respawned hub' : 'did not reconnect within 30 s'} after the kill; new hub pids: ${(await stack.hubPids()).join(',') || 'none'}`);
      }
      assert.deepEqual(errors, [], 'no uncaught page errors');
    } finally {
      await context.close();
    }
  });
});

test('reload mid-upload: the same file resumes without resending stored chunks', { skip: SKIP || false, timeout: TIMEOUT }, async () => {
  await withStack('reload', async (stack) => {
    const { page, errors, context } = await openPage(browser, pageUrl(stack, { chunk_delay_ms: '250' }));
    try {
      let phase = 1;
      const puts = { 1: [], 2: [] };
      page.on('request', (req) => {
        const m = /\/api\/uploads\/([0-9a-z]{26})\/chunks\/(\d+)$/.exec(new URL(req.url()).pathname);
        if (req.method() === 'PUT' && m) puts[phase].push(Number(m[2]));
      });
      await page.setInputFiles('#file-input', file.path);
      const uploadId = await (await page.waitForSelector('#uploads .upload[data-upload-id]')).getAttribute('data-upload-id');
      const chunkCount = Math.ceil(file.size / CHUNK);
      const minStored = Math.max(2, Math.floor(chunkCount * 0.15));
      await waitFor(async () => {
        const st = await getJson(`${stack.baseUrl}/api/uploads/${uploadId}`);
        return st.json && st.json.chunks_done >= minStored ? st.json : null;
      }, 120000, `${minStored} chunks stored`);

      await page.reload();
      await page.waitForSelector('body[data-ready="1"]');
      await new Promise((r) => setTimeout(r, 1500)); // requests cut by the reload settle
      const st = (await getJson(`${stack.baseUrl}/api/uploads/${uploadId}`)).json;
      assert.equal(st.state, 'uploading', 'not finished before the reload');
      const missing = new Set(st.missing);
      const stored = [];
      for (let i = 0; i < chunkCount; i++) if (!missing.has(i)) stored.push(i);
      assert.ok(stored.length >= minStored && stored.length < chunkCount, `stored before resume: ${stored.length}`);
      // The page lists the unfinished upload.
      assert.ok(await page.isVisible('#resumable'), 'the page offers to resume the unfinished upload');

      phase = 2;
      await page.setInputFiles('#file-input', file.path);
      await waitForState(page, 'complete', TIMEOUT - 60_000);
      const row = await rowInfo(page);
      assert.equal(row.id, uploadId, 'the same upload id was resumed');
      const resent = puts[2].filter((i) => stored.includes(i));
      assert.deepEqual(resent, [], `chunks stored before the reload were not sent again (sent after reload: ${[...new Set(puts[2])].sort((a, b) => a - b).join(',')})`);
      for (const i of missing) assert.ok(puts[2].includes(i), `missing chunk ${i} was sent after the reload`);
      await storedFileMatches(stack, uploadId);
      assert.deepEqual(errors, [], 'no uncaught page errors');
    } finally {
      await context.close();
    }
  });
});

test('screenshot mid-upload saved to artifacts/', { skip: SKIP || false, timeout: TIMEOUT }, async () => {
  await withStack('screenshot', async (stack) => {
    const { page, errors, context } = await openPage(browser, pageUrl(stack, { chunk_delay_ms: '200', parallel: '2' }));
    try {
      await page.waitForSelector('#connection[data-socket-state="connected"]', { timeout: 20000 }).catch(() => {});
      await page.setInputFiles('#file-input', file.path);
      await page.waitForFunction(() => {
        const r = document.querySelector('#uploads .upload');
        if (!r) return false;
        const done = Number(r.dataset.bytesDone);
        const total = Number(r.dataset.bytesTotal);
        return total > 0 && done >= total * 0.15 && done <= total * 0.85;
      }, null, { timeout: 120000, polling: 50 });
      const out = path.join(ensureArtifacts(), 'upload-mid.png');
      await page.screenshot({ path: out, fullPage: true });
      const size = fs.statSync(out).size;
      assert.ok(size > 5000, `screenshot written (${size} bytes)`);
      const row = await rowInfo(page);
      assert.equal(row.state, 'uploading', 'the screenshot shows a running upload');
      // Pause / resume from the buttons on the way.
      await page.click('#uploads .upload [data-action="pause"]');
      await page.waitForSelector('#uploads .upload[data-state="paused"]');
      await page.click('#uploads .upload [data-action="resume"]');
      await waitForState(page, 'complete', TIMEOUT - 60_000);
      await page.screenshot({ path: path.join(ensureArtifacts(), 'upload-complete.png'), fullPage: true });
      await storedFileMatches(stack, (await rowInfo(page)).id);
      assert.deepEqual(errors, [], 'no uncaught page errors');
    } finally {
      await context.close();
    }
  });
});

test('network loss mid-upload (browser offline, then online): the upload resumes and completes', { skip: SKIP || false, timeout: TIMEOUT }, async (t) => {
  await withStack('offline', async (stack) => {
    const { page, errors, context } = await openPage(browser, pageUrl(stack, { chunk_delay_ms: '150' }));
    try {
      await page.setInputFiles('#file-input', file.path);
      await page.waitForFunction(() => {
        const r = document.querySelector('#uploads .upload');
        return r && Number(r.dataset.bytesDone) > Number(r.dataset.bytesTotal) * 0.1;
      }, null, { timeout: 120000, polling: 50 });
      await context.setOffline(true);
      await new Promise((r) => setTimeout(r, 2500));
      const during = await rowInfo(page);
      assert.equal(during.state, 'uploading', 'still uploading (waiting), not failed, while offline');
      await context.setOffline(false);
      await waitForState(page, 'complete', TIMEOUT - 60_000);
      const row = await rowInfo(page);
      t.diagnostic(`offline at ${during.done} of ${during.total} bytes`);
      await storedFileMatches(stack, row.id);
      assert.deepEqual(errors, [], 'no uncaught page errors');
    } finally {
      await context.close();
    }
  });
});

test('several files at once; cancel removes one upload on the server, the others complete', { skip: SKIP || false, timeout: TIMEOUT }, async () => {
  await withStack('multi', async (stack) => {
    const small = [randomFile(6 * MiB, 'one.bin'), randomFile(9 * MiB, 'two.bin'), randomFile(12 * MiB, 'three.bin')];
    const { page, errors, context } = await openPage(browser, pageUrl(stack, { chunk_size: String(MiB), chunk_delay_ms: '100', parallel: '2' }));
    try {
      await page.setInputFiles('#file-input', small.map((f) => f.path));
      await page.waitForFunction(() => document.querySelectorAll('#uploads .upload[data-upload-id]').length === 3, null, { timeout: 30000 });
      const victim = page.locator('#uploads .upload[data-file-name="three.bin"]');
      const victimId = await victim.getAttribute('data-upload-id');
      await victim.locator('[data-action="cancel"]').click();
      await page.waitForSelector(`#uploads .upload[data-upload-id="${victimId}"][data-state="aborted"]`);
      await waitFor(async () => (await getJson(`${stack.baseUrl}/api/uploads/${victimId}`)).status === 404, 10000, 'the cancelled upload is gone on the server');
      for (const f of small.slice(0, 2)) {
        const row = page.locator(`#uploads .upload[data-file-name="${path.basename(f.path)}"]`);
        await row.and(page.locator('[data-state="complete"]')).waitFor({ timeout: 120000 });
        const id = await row.getAttribute('data-upload-id');
        const st = (await getJson(`${stack.baseUrl}/api/uploads/${id}`)).json;
        assert.equal(st.state, 'complete');
        assert.equal(sha256File(path.join(stack.storageDir, id, 'data')), f.sha256, `${f.path} stored intact`);
      }
      assert.deepEqual(errors, [], 'no uncaught page errors');
    } finally {
      await context.close();
      for (const f of small) f.cleanup();
    }
  });
});
