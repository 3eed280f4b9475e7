--TEST--
version() returns the semver of the extension, the same as phpversion()
--FILE--
<?php
$v = UploadProgress\version();
var_dump((bool) preg_match('/^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$/', $v));
var_dump($v === phpversion('upload_progress'));
?>
--EXPECT--
bool(true)
bool(true)
