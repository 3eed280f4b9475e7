<?php
// GET ?channel=&event=&data=(JSON) → publishes and returns the result.
header('Content-Type: application/json');
$data = $_GET['data'] ?? '{}';
$decoded = json_decode($data, true);
$ok = UploadProgress\publish($_GET['channel'] ?? 'test', $_GET['event'] ?? 'test', is_array($decoded) ? $decoded : $data);
echo json_encode(['ok' => $ok, 'pid' => getmypid()]);
