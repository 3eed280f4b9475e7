<?php
// GET ?channel=&n= → n progress events of ~8 KB on the channel, then `complete`;
// returns what publish() said and what this process counted.
header('Content-Type: application/json');
$channel = $_GET['channel'] ?? 'test';
$n = (int)($_GET['n'] ?? 300);
$pad = str_repeat('x', 8000);
$ok = 0;
$t0 = hrtime(true);
for ($i = 1; $i <= $n; $i++) {
    $ok += UploadProgress\publish($channel, 'progress', ['seq' => $i, 'pad' => $pad]) ? 1 : 0;
}
$complete = UploadProgress\publish($channel, 'complete', ['seq' => $n]);
$status = UploadProgress\hub_status();
echo json_encode([
    'ok' => $ok,
    'complete' => $complete,
    'ms' => (hrtime(true) - $t0) / 1e6,
    'coalesced' => $status['events_coalesced_here'] ?? null,
    'dropped' => $status['events_dropped_here'] ?? null,
    'pid' => getmypid(),
]);
