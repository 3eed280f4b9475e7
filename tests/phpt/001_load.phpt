--TEST--
upload_progress loads and exposes its functions and classes
--FILE--
<?php
var_dump(extension_loaded('upload_progress'));
foreach (['version', 'publish', 'auth', 'progress', 'hub_status'] as $f) {
    echo $f, ': ', function_exists("UploadProgress\\$f") ? 'yes' : 'no', "\n";
}
foreach (['Upload', 'Hub', 'Exception', 'NotFoundException'] as $c) {
    echo $c, ': ', class_exists("UploadProgress\\$c") ? 'yes' : 'no', "\n";
}
$r = new ReflectionClass(UploadProgress\Upload::class);
var_dump($r->isFinal());
?>
--EXPECT--
bool(true)
version: yes
publish: yes
auth: yes
progress: yes
hub_status: yes
Upload: yes
Hub: yes
Exception: yes
NotFoundException: yes
bool(true)
