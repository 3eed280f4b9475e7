<?php
header('Content-Type: application/json');
echo json_encode(UploadProgress\progress($_GET['id'] ?? ''));
