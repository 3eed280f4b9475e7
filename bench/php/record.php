<?php
// Cost of recording one progress update from a PHP script.
// php record.php <method> <calls> [args...]   → one JSON line
//   methods: publish | publish_str | redis <port> | file <dir> | apcu
// Calls are timed with hrtime(true) in batches; between batches the script sleeps
// 1 ms so that a consumer (the hub) keeps up and the send path, not the drop path,
// is what publish() rows measure. Result: median (and p10/p90) of batch means.
declare(strict_types=1);

$method = $argv[1] ?? 'publish';
$calls = (int)($argv[2] ?? 100000);
$batch = 200;
$batches = intdiv($calls + $batch - 1, $batch);
$id = 'b' . str_repeat('0', 24) . '1';
$channel = "private-upload.$id";
$state = [
    'upload_id' => $id, 'seq' => 0, 'state' => 'uploading', 'bytes_done' => 0,
    'bytes_total' => 1073741824, 'chunks_done' => 3, 'chunk_count' => 128,
    'rate_bps' => 412000000, 'eta_s' => 2.4, 'ts_ms' => 0,
];

$ok = 0; $fail = 0;
switch ($method) {
    case 'publish':
        $op = function (int $i) use (&$state, $channel, &$ok, &$fail) {
            $state['seq'] = $i + 1; $state['bytes_done'] = $i * 8192;
            UploadProgress\publish($channel, 'progress', $state) ? $ok++ : $fail++;
        };
        break;
    case 'publish_str':
        $op = function (int $i) use (&$state, $channel, &$ok, &$fail) {
            $state['seq'] = $i + 1; $state['bytes_done'] = $i * 8192;
            UploadProgress\publish($channel, 'progress', json_encode($state)) ? $ok++ : $fail++;
        };
        break;
    case 'redis':
        $r = new Redis();
        $r->connect('127.0.0.1', (int)$argv[3]);
        $op = function (int $i) use (&$state, $id, $r, &$ok, &$fail) {
            $state['seq'] = $i + 1; $state['bytes_done'] = $i * 8192;
            $j = json_encode($state);
            $a = $r->hSet("upload:$id", 'state', $j);
            $b = $r->publish("upload:$id", $j);
            ($a !== false && $b !== false) ? $ok++ : $fail++;
        };
        break;
    case 'file':
        $path = rtrim($argv[3], '/') . "/$id.json";
        $op = function (int $i) use (&$state, $path, &$ok, &$fail) {
            $state['seq'] = $i + 1; $state['bytes_done'] = $i * 8192;
            file_put_contents($path, json_encode($state), LOCK_EX) !== false ? $ok++ : $fail++;
        };
        break;
    case 'apcu':
        if (!apcu_enabled()) { fwrite(STDERR, "apcu not enabled\n"); exit(2); }
        $op = function (int $i) use (&$state, $id, &$ok, &$fail) {
            $state['seq'] = $i + 1; $state['bytes_done'] = $i * 8192;
            apcu_store("upload:$id", $state) ? $ok++ : $fail++;
        };
        break;
    default:
        fwrite(STDERR, "unknown method $method\n"); exit(2);
}

// warm-up
for ($i = 0; $i < 1000; $i++) { $op($i); }
$ok = 0; $fail = 0;
usleep(20000);

$means = [];
$n = 1000;
for ($b = 0; $b < $batches; $b++) {
    $t0 = hrtime(true);
    for ($k = 0; $k < $batch; $k++) { $op($n++); }
    $t1 = hrtime(true);
    $means[] = ($t1 - $t0) / $batch;
    usleep(1000);
}
// the loop (closure call, array updates) costs too: measure an empty operation
$empty = function (int $i) use (&$state) { $state['seq'] = $i + 1; $state['bytes_done'] = $i * 8192; };
$base = [];
for ($b = 0; $b < 200; $b++) {
    $t0 = hrtime(true);
    for ($k = 0; $k < $batch; $k++) { $empty($k); }
    $base[] = (hrtime(true) - $t0) / $batch;
}
sort($means); sort($base);
$q = fn(array $v, float $p) => $v[(int)round((count($v) - 1) * $p)];
echo json_encode([
    'method' => $method, 'calls' => $batches * $batch, 'batch' => $batch,
    'median_ns' => $q($means, 0.5), 'p10_ns' => $q($means, 0.1), 'p90_ns' => $q($means, 0.9),
    'loop_ns' => $q($base, 0.5), 'ok' => $ok, 'failed' => $fail,
    // progress events replaced by a newer one while the hub's socket was full (not lost)
    'coalesced' => str_starts_with($method, 'publish')
        ? (UploadProgress\hub_status()['events_coalesced_here'] ?? null) : null,
]), "\n";
