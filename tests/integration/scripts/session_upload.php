<?php
// First call (GET) starts a session; the multipart POST carries
// PHP_SESSION_UPLOAD_PROGRESS; with cleanup off the progress stays in the session.
session_start();
header('Content-Type: application/json');
$key = ini_get('session.upload_progress.prefix') . 'pytest';
echo json_encode(['progress' => $_SESSION[$key] ?? null, 'files' => array_keys($_FILES)]);
