--TEST--
Hub::run() refuses to start without a usable storage root / app secret (an empty HMAC key would let anyone sign private channels)
--INI--
upload_progress.storage_dir=/proc/upload-progress-not-writable
upload_progress.hub_socket=@upload-progress-phpt-nosecret
--FILE--
<?php
try { UploadProgress\Hub::run(); echo "started\n"; }
catch (UploadProgress\Exception $e) { echo get_class($e), ': ', $e->getMessage(), "\n"; }
?>
--EXPECTF--
UploadProgress\Exception: Hub::run(): %s/proc/upload-progress-not-writable%s
