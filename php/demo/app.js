// The demo page of upload_progress: one row per upload, updated from WebSocket events.
// Query parameters (for trying things out and for the browser tests):
//   ?chunk_size=4194304   chunk size asked for new uploads (bytes)
//   ?parallel=4           chunks in flight per upload
//   ?chunk_delay_ms=0     wait before each chunk request (makes progress easy to watch)
//   ?poll_ms=1000         polling interval while the socket is down
import { createClient, SocketState, UploadState } from '/client/upload-progress.js';

const params = new URLSearchParams(location.search);
const intParam = (name) => {
  const v = Number.parseInt(params.get(name) ?? '', 10);
  return Number.isFinite(v) && v > 0 ? v : null;
};
const uploadOptions = {
  parallel: intParam('parallel') ?? 4,
  chunkSize: intParam('chunk_size'),
  chunkDelayMs: intParam('chunk_delay_ms') ?? 0,
  pollIntervalMs: intParam('poll_ms') ?? 1000,
};

const $ = (sel, root = document) => root.querySelector(sel);
const list = $('#uploads');
const empty = $('#empty');
const template = $('#row-template');
const connection = $('#connection');
const rows = new Map(); // ChunkedUpload -> row element

// -------------------------------------------------------------------------------------
// formatting
// -------------------------------------------------------------------------------------
function fmtBytes(n) {
  if (!Number.isFinite(n)) return '–';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}
function fmtRate(bps) { return bps > 0 ? `${fmtBytes(bps)}/s` : ''; }
function fmtEta(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return '';
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s left`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s left`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min left`;
}
const STATE_LABEL = {
  pending: 'starting', uploading: 'uploading', paused: 'paused', complete: 'complete', aborted: 'cancelled', failed: 'failed',
};

// -------------------------------------------------------------------------------------
// connection indicator
// -------------------------------------------------------------------------------------
function showSocketState(state) {
  connection.dataset.socketState = state;
  $('.label', connection).textContent = {
    [SocketState.CONNECTED]: 'live',
    [SocketState.CONNECTING]: 'connecting…',
    [SocketState.RECONNECTING]: 'reconnecting · polling',
    [SocketState.DISCONNECTED]: 'offline · polling',
  }[state] ?? state;
}

// -------------------------------------------------------------------------------------
// rows
// -------------------------------------------------------------------------------------
function render(upload) {
  const row = rows.get(upload);
  if (!row) return;
  const done = upload.bytesDone;
  const total = upload.bytesTotal;
  const pct = total > 0 ? Math.min(100, (done / total) * 100) : (upload.state === UploadState.COMPLETE ? 100 : 0);
  if (upload.id && row.dataset.uploadId !== upload.id) row.dataset.uploadId = upload.id;
  row.dataset.state = upload.state;
  row.dataset.bytesDone = String(done);
  row.dataset.bytesTotal = String(total);
  $('.fill', row).style.width = `${pct.toFixed(2)}%`;
  $('.bar', row).setAttribute('aria-valuenow', pct.toFixed(0));
  $('.state', row).textContent = STATE_LABEL[upload.state] ?? upload.state;
  $('.bytes', row).textContent = `${fmtBytes(done)} of ${fmtBytes(total)}`;
  $('.pct', row).textContent = `${Math.floor(pct)}%`;
  const active = upload.state === UploadState.UPLOADING;
  $('.speed', row).textContent = active ? fmtRate(upload.rateBps) : '';
  $('.eta', row).textContent = active && done < total ? fmtEta(upload.etaS) : '';
  $('[data-action=pause]', row).disabled = !active;
  $('[data-action=resume]', row).disabled = !(upload.state === UploadState.PAUSED || upload.state === UploadState.FAILED);
  $('[data-action=cancel]', row).disabled = upload.state === UploadState.COMPLETE || upload.state === UploadState.ABORTED;
  if (upload.state === UploadState.COMPLETE) $('.message', row).textContent = upload.resumed ? 'resumed and stored' : 'stored';
}

function addRow(upload) {
  const row = template.content.firstElementChild.cloneNode(true);
  const name = upload.file.name || 'upload';
  const ext = name.includes('.') ? name.split('.').pop().slice(0, 4) : 'file';
  $('.ext', row).textContent = ext.toUpperCase();
  $('.name', row).textContent = name;
  $('.name', row).title = name;
  row.dataset.fileName = name;
  rows.set(upload, row);
  list.prepend(row);
  empty.hidden = true;

  row.addEventListener('click', (e) => {
    const action = e.target.closest('button')?.dataset.action;
    if (action === 'pause') upload.pause();
    else if (action === 'resume') upload.resume();
    else if (action === 'cancel') upload.cancel();
  });

  let frame = 0;
  const schedule = () => {
    // Attributes are updated at once (tests and screen readers read them); paint once a frame.
    render(upload);
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(upload); });
  };
  upload.addEventListener('id', (e) => {
    if (e.detail.resumed) $('.message', row).textContent = 'resuming: only missing chunks are sent';
    schedule();
    refreshResumable();
  });
  upload.addEventListener('progress', (e) => {
    const counts = window.uploadDemo.progressSources;
    counts[e.detail.source] = (counts[e.detail.source] ?? 0) + 1;
    schedule();
  });
  upload.addEventListener('state', schedule);
  upload.addEventListener('complete', () => { schedule(); refreshResumable(); });
  upload.addEventListener('error', (e) => {
    const msg = $('.message', row);
    msg.textContent = e.detail.fatal ? e.detail.message : (e.detail.status ? `retrying (${e.detail.status})` : 'retrying…');
    msg.classList.toggle('bad', !!e.detail.fatal);
    if (e.detail.fatal) console.warn('upload failed:', e.detail.message);
  });
  render(upload);
}

// -------------------------------------------------------------------------------------
// unfinished uploads remembered in localStorage
// -------------------------------------------------------------------------------------
function refreshResumable() {
  const box = $('#resumable');
  const ul = $('#resumable-list');
  ul.textContent = '';
  const active = new Set([...rows.keys()].map((u) => u.id).filter(Boolean));
  let n = 0;
  try {
    for (let i = 0; i < localStorage.length; i++) {
      const key = localStorage.key(i);
      if (!key || !key.startsWith('upload-progress:')) continue;
      const v = JSON.parse(localStorage.getItem(key) || 'null');
      if (!v || active.has(v.id)) continue;
      const li = document.createElement('li');
      li.textContent = `${v.name ?? 'file'} (${fmtBytes(v.size)})`;
      ul.append(li);
      n++;
    }
  } catch { /* storage unavailable */ }
  box.hidden = n === 0;
}

// -------------------------------------------------------------------------------------
// start
// -------------------------------------------------------------------------------------
const client = await createClient({ ...uploadOptions });
window.uploadDemo = { client, uploads: [], options: uploadOptions, progressSources: {} };
if (client.socket) {
  showSocketState(client.socket.state);
  client.addEventListener('socketstate', (e) => showSocketState(e.detail.current));
} else {
  showSocketState(SocketState.DISCONNECTED);
}
if (client.config?.extension) $('#version').textContent = `extension ${client.config.extension}`;

function startFiles(files) {
  for (const file of files) {
    const upload = client.upload(file);
    window.uploadDemo.uploads.push(upload);
    addRow(upload);
    upload.start().catch(() => { /* shown in the row */ });
  }
}

const input = $('#file-input');
input.addEventListener('change', () => {
  startFiles([...input.files]);
  input.value = '';
});

const zone = $('#dropzone');
for (const type of ['dragenter', 'dragover']) {
  zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add('over'); });
}
for (const type of ['dragleave', 'drop']) {
  zone.addEventListener(type, () => zone.classList.remove('over'));
}
zone.addEventListener('drop', (e) => {
  e.preventDefault();
  const files = [...(e.dataTransfer?.files ?? [])];
  if (files.length) startFiles(files);
});
// Dropping outside the zone must not navigate away from the page (and lose the uploads).
window.addEventListener('dragover', (e) => e.preventDefault());
window.addEventListener('drop', (e) => e.preventDefault());

refreshResumable();
document.body.dataset.ready = '1';
