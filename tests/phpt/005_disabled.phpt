--TEST--
upload_progress.enabled=0 still loads and exposes the API, and publishes nothing
--INI--
upload_progress.enabled=0
--FILE--
<?php
var_dump(extension_loaded('upload_progress'));
var_dump(is_string(UploadProgress\version()));
var_dump(UploadProgress\publish('updates', 'ping', ['a' => 1]));
var_dump(UploadProgress\progress('nothing-here'));
var_dump(UploadProgress\hub_status()['running']);
var_dump(class_exists(UploadProgress\Upload::class));
?>
--EXPECT--
bool(true)
bool(true)
bool(false)
NULL
bool(false)
bool(true)
