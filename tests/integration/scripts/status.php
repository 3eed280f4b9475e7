<?php
header('Content-Type: application/json');
echo json_encode(['hub' => UploadProgress\hub_status(), 'pid' => getmypid(), 'ppid' => posix_getppid_or_null()]);
function posix_getppid_or_null() { return function_exists('posix_getppid') ? posix_getppid() : null; }
