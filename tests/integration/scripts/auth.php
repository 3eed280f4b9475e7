<?php
header('Content-Type: application/json');
echo UploadProgress\auth($_POST['socket_id'] ?? '', $_POST['channel_name'] ?? '');
