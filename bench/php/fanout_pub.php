<?php
// Publishes <count> events, <interval_ms> apart, whose data carries the send time:
// "T=<hrtime ns, CLOCK_MONOTONIC>;I=<index>;<padding>" (a ~150-byte Pusher frame).
//   php fanout_pub.php hub <count> <interval_ms> <first_index> [channel]     via UploadProgress\publish()
//   php fanout_pub.php udp <count> <interval_ms> <first_index> <udp_port> [channel]  via a UDP datagram to the Node ws server
$mode = $argv[1];
$count = (int)$argv[2];
$interval = (int)$argv[3];
$first = (int)$argv[4];
$udp = null;
$channel = 'bench';
if ($mode === 'udp') {
    $udp = stream_socket_client('udp://127.0.0.1:' . (int)$argv[5], $errno, $errstr);
    if (!$udp) { fwrite(STDERR, "udp: $errstr\n"); exit(2); }
    $channel = $argv[6] ?? $channel;
} else {
    $channel = $argv[5] ?? $channel;
}
$pad = str_repeat('x', 60);
if (!$udp) {
    // connect to the hub first: the first timed event must not pay for it
    UploadProgress\publish('bench-warmup', 'warmup', 'x');
    usleep(20000);
}
$failed = 0;
for ($k = 0; $k < $count; $k++) {
    $i = $first + $k;
    $data = 'T=' . hrtime(true) . ";I=$i;$pad";
    if ($udp) {
        fwrite($udp, "$channel\nbench\n$data");
    } else {
        if (!UploadProgress\publish($channel, 'bench', $data)) $failed++;
    }
    if ($k + 1 < $count) usleep($interval * 1000);
}
echo json_encode(['sent' => $count, 'failed' => $failed]), "\n";
