<?php
// Echoes what the script received: a multipart file or the raw body.
header('Content-Type: application/json');
if (!empty($_FILES)) {
    $f = reset($_FILES);
    echo json_encode(['kind' => 'file', 'size' => $f['size'], 'error' => $f['error'],
        'sha256' => $f['error'] === 0 ? hash_file('sha256', $f['tmp_name']) : null]);
    return;
}
$ctx = hash_init('sha256');
$in = fopen('php://input', 'rb');
$n = 0;
while (!feof($in)) { $b = fread($in, 1 << 20); if ($b === '' || $b === false) break; $n += strlen($b); hash_update($ctx, $b); }
echo json_encode(['kind' => 'raw', 'size' => $n, 'sha256' => hash_final($ctx)]);
