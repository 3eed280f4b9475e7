// Shared helpers of the browser tests: a stack (nginx + php-fpm + extension) per test via
// tools/stack.py, chromium through playwright-core, random test files.
import { spawnSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(HERE, '..', '..');
export const STACK_PY = path.join(REPO, 'tools', 'stack.py');
export const ARTIFACTS = path.join(HERE, 'artifacts');
export const MOCK = process.env.UPLOAD_PROGRESS_MOCK === '1';
export const EXT = process.env.UPLOAD_PROGRESS_EXT || '';
export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless=new', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--no-first-run', '--disable-sync',
  '--disable-dev-shm-usage', '--disable-features=Translate,MediaRouter,OptimizationHints',
];

/** Why the browser tests cannot run here, or null when they can. */
export function skipReason() {
  if (!MOCK && !EXT) return 'UPLOAD_PROGRESS_EXT is not set (path of the built extension)';
  if (!MOCK && !fs.existsSync(EXT)) return `UPLOAD_PROGRESS_EXT=${EXT} does not exist`;
  if (!fs.existsSync(CHROMIUM)) return `${CHROMIUM} not found (apt-get install -y chromium)`;
  return null;
}

const live = new Set();
process.on('exit', () => { for (const s of live) s.stopSync(); });
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => { for (const s of live) s.stopSync(); process.exit(130); });
}

function cleanEnv() {
  const env = { ...process.env };
  // A test stack must not pick up the demo's settings from the environment.
  for (const k of ['DEMO_DIR', 'DEMO_PORT', 'HUB_PORT', 'STORAGE_DIR', 'REDIS_URL', 'APP_ID', 'APP_KEY', 'APP_SECRET']) delete env[k];
  return env;
}

/**
 * Start a stack in a fresh temp dir. options.ini: {directive: value}.
 * Returns {baseUrl, hubPort, storageDir, runDir, state, stop(), hubPids(), logTail()}.
 */
export async function startStack(name, options = {}) {
  const runDir = fs.mkdtempSync(path.join(os.tmpdir(), `up-browser-${name}-`));
  const args = [STACK_PY, 'up', '--dir', runDir, '--http-port', '0', '--hub-port', '0'];
  const ini = { 'upload_progress.min_interval_ms': '50', ...(options.ini || {}) };
  if (MOCK) {
    args.push('--ext', 'none');
    ini.auto_prepend_file = path.join(HERE, 'mock', 'upload_progress_mock.php');
  } else {
    args.push('--ext', EXT);
  }
  for (const [k, v] of Object.entries(ini)) args.push('--ini', `${k}=${v}`);
  const r = spawnSync('python3', args, { env: cleanEnv(), encoding: 'utf8', timeout: 60000 });
  if (r.status !== 0) {
    throw new Error(`stack.py up failed (${r.status}):\n${r.stdout}\n${r.stderr}`);
  }
  const state = JSON.parse(fs.readFileSync(path.join(runDir, 'stack.json'), 'utf8'));
  const stack = {
    name,
    runDir,
    state,
    baseUrl: state.base_url,
    hubPort: state.hub_port,
    storageDir: state.storage_dir,
    mockHub: null,
    stopped: false,
    stopSync() {
      if (this.stopped) return;
      this.stopped = true;
      live.delete(this);
      if (this.mockHub && this.mockHub.exitCode === null) { try { this.mockHub.kill('SIGKILL'); } catch { /* gone */ } }
      spawnSync('python3', [STACK_PY, 'down', '--dir', runDir], { env: cleanEnv(), encoding: 'utf8', timeout: 60000 });
    },
    async stop() {
      this.stopSync();
      if (!process.env.KEEP_STACK) fs.rmSync(runDir, { recursive: true, force: true });
    },
    logTail(n = 40) {
      const files = ['fpm.log', 'php-error.log', 'nginx-error.log'].map((f) => path.join(runDir, f));
      if (fs.existsSync(state.storage_dir)) {
        for (const f of fs.readdirSync(state.storage_dir)) if (/^hub-.*\.log$/.test(f)) files.push(path.join(state.storage_dir, f));
      }
      return files.filter((f) => fs.existsSync(f)).map((f) => {
        const lines = fs.readFileSync(f, 'utf8').trimEnd().split('\n');
        return `==> ${f} <==\n${lines.slice(-n).join('\n')}`;
      }).join('\n');
    },
    /** Pids of the hub: GET /health {pid}, else the process listening on the hub port. */
    async hubPids() {
      try {
        const res = await fetch(`http://127.0.0.1:${this.hubPort}/health`, { signal: AbortSignal.timeout(2000) });
        const j = await res.json().catch(() => null);
        if (j && Number.isInteger(j.pid)) return [j.pid];
      } catch { /* no hub answering */ }
      const r = spawnSync('python3', [STACK_PY, 'hub-pid', '--dir', runDir], { encoding: 'utf8' });
      return r.stdout.trim().split(/\s+/).filter(Boolean).map(Number);
    },
  };
  live.add(stack);
  if (MOCK) {
    stack.mockHub = spawn(process.execPath, [path.join(HERE, 'mock', 'hub.mjs'), '--port', String(stack.hubPort)], { stdio: 'ignore' });
    await waitFor(async () => {
      try { return (await fetch(`http://127.0.0.1:${stack.hubPort}/health`)).ok; } catch { return false; }
    }, 10000, 'mock hub');
  }
  return stack;
}

export async function waitFor(fn, timeoutMs, what = 'condition', intervalMs = 50) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    last = await fn();
    if (last) return last;
    await new Promise((r) => setTimeout(r, intervalMs));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}

/** A file of `size` random bytes in a temp dir; returns {path, sha256, size, cleanup()}. */
export function randomFile(size, name = 'random.bin') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'up-browser-file-'));
  const file = path.join(dir, name);
  const fd = fs.openSync(file, 'w');
  const hash = crypto.createHash('sha256');
  const block = 16 * 1024 * 1024;
  for (let off = 0; off < size; off += block) {
    const buf = crypto.randomBytes(Math.min(block, size - off));
    hash.update(buf);
    fs.writeSync(fd, buf);
  }
  fs.closeSync(fd);
  return { path: file, sha256: hash.digest('hex'), size, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

export function sha256File(file) {
  const hash = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(8 * 1024 * 1024);
  for (;;) {
    const n = fs.readSync(fd, buf, 0, buf.length, null);
    if (n <= 0) break;
    hash.update(buf.subarray(0, n));
  }
  fs.closeSync(fd);
  return hash.digest('hex');
}

// The demo gives uploads to the session that created them (an HttpOnly cookie). Every
// page of this run starts with the same session, so checks from Node can read them.
export const OWNER = crypto.randomBytes(16).toString('hex');

export async function getJson(url) {
  const res = await fetch(url, { headers: { Accept: 'application/json', Cookie: `upload_owner=${OWNER}` } });
  const text = await res.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: res.status, json, text };
}

let pw = null;
export async function launchBrowser() {
  pw ??= await import('playwright-core');
  return pw.chromium.launch({ executablePath: CHROMIUM, headless: false, args: CHROMIUM_ARGS, timeout: 60000 });
}

/** A page that records uncaught errors; `errors` collects them. */
export async function openPage(browser, url) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  await context.addCookies([{ name: 'upload_owner', value: OWNER, url: new URL(url).origin + '/api/', httpOnly: true, sameSite: 'Strict' }]);
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(String(err?.stack || err)));
  page.on('console', (msg) => { if (process.env.BROWSER_CONSOLE) console.log(`[console.${msg.type()}] ${msg.text()}`); });
  await page.goto(url);
  await page.waitForSelector('body[data-ready="1"]', { timeout: 20000 });
  return { context, page, errors };
}

/** Install a MutationObserver that records every data-bytes-done / data-state of the rows. */
export async function recordRows(page) {
  await page.evaluate(() => {
    window.__samples = [];
    const seen = (row) => window.__samples.push({
      t: performance.now(), id: row.dataset.uploadId || null, state: row.dataset.state,
      done: Number(row.dataset.bytesDone), total: Number(row.dataset.bytesTotal),
    });
    new MutationObserver((muts) => {
      for (const m of muts) {
        if (m.type === 'attributes' && m.target.matches?.('.upload')) seen(m.target);
        else if (m.type === 'childList') for (const n of m.addedNodes) if (n.matches?.('.upload')) seen(n);
      }
    }).observe(document.querySelector('#uploads'), { subtree: true, childList: true, attributes: true, attributeFilter: ['data-bytes-done', 'data-state', 'data-upload-id'] });
  });
}

export async function rowInfo(page) {
  return page.evaluate(() => {
    const row = document.querySelector('#uploads .upload');
    if (!row) return null;
    return { id: row.dataset.uploadId || null, state: row.dataset.state, done: Number(row.dataset.bytesDone), total: Number(row.dataset.bytesTotal) };
  });
}

export async function waitForState(page, state, timeoutMs) {
  await page.waitForFunction((s) => {
    const row = document.querySelector('#uploads .upload');
    if (!row) return false;
    if (row.dataset.state === 'failed' || row.dataset.state === 'aborted') {
      throw new Error(`upload ended ${row.dataset.state}: ${row.querySelector('.message')?.textContent}`);
    }
    return row.dataset.state === s;
  }, state, { timeout: timeoutMs, polling: 100 });
}

export function ensureArtifacts() {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  return ARTIFACTS;
}
