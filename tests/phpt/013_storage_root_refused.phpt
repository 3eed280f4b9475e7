--TEST--
Storage root open to group/other or a symlink: every Upload call, Hub::run() and phpinfo name the path and the problem; nothing is chmod'ed
--DESCRIPTION--
Attacker: another local user created the storage root first (or it was left 0755, or
replaced by a symlink). Old code used it as it was, planted .app-secret and links included.
--INI--
upload_progress.hub=off
upload_progress.hub_socket=@upload-progress-phpt-013
upload_progress.app_secret=phpt-secret
upload_progress.storage_dir=/tmp/upload-progress-phpt-013
--FILE--
<?php
use UploadProgress\Upload;
$dir = '/tmp/upload-progress-phpt-013';
function attempt(string $what, callable $f) {
    try { $f(); echo "$what: accepted\n"; }
    catch (Throwable $e) { echo "$what: ", get_class($e), ': ', $e->getMessage(), "\n"; }
}
function all_calls(string $dir, ?Upload $u) {
    attempt('create', fn() => Upload::create(10));
    attempt('open', fn() => Upload::open($u->id));
    attempt('status', fn() => $u->status());
    attempt('writeChunk', fn() => $u->writeChunk(0, __FILE__));
    attempt('complete', fn() => $u->complete());
    attempt('abort', fn() => $u->abort());
    attempt('Hub::run', fn() => UploadProgress\Hub::run());
    ob_start(); phpinfo(INFO_MODULES); $info = ob_get_clean();
    preg_match('/^storage root => (.*)$/m', $info, $m);
    echo 'phpinfo: ', $m[1] ?? 'no row', "\n";
}
$u = Upload::create(10);
echo "created, root mode ", decoct(fileperms($dir) & 0777), "\n";
chmod($dir, 0755);
echo "== 0755\n";
all_calls($dir, $u);
clearstatcache();
printf("mode still %o\n", fileperms($dir) & 0777);
chmod($dir, 0700);
rename($dir, "$dir.real");
symlink("$dir.real", $dir);
echo "== symlink\n";
all_calls($dir, $u);
unlink($dir);
rename("$dir.real", $dir);
echo "== 0700 again\n";
attempt('status', fn() => $u->status()['state']);
$u->abort();
?>
--CLEAN--
<?php
$dir = '/tmp/upload-progress-phpt-013';
@unlink($dir);
foreach ([$dir, "$dir.real"] as $d) {
    if (is_dir($d) && !is_link($d)) { exec('rm -rf ' . escapeshellarg($d)); }
}
?>
--EXPECTF--
created, root mode 700
== 0755
create: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 has mode 0755: group/other permission bits must be clear (0700); refusing to use it%s
open: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 has mode 0755%s
status: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 has mode 0755%s
writeChunk: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 has mode 0755%s
complete: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 has mode 0755%s
abort: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 has mode 0755%s
Hub::run: UploadProgress\Exception: Hub::run(): storage directory /tmp/upload-progress-phpt-013 has mode 0755%s
phpinfo: refused: storage directory /tmp/upload-progress-phpt-013 has mode 0755%s
mode still 755
== symlink
create: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 is a symbolic link%s
open: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 is a symbolic link%s
status: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 is a symbolic link%s
writeChunk: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 is a symbolic link%s
complete: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 is a symbolic link%s
abort: UploadProgress\StorageException: storage directory /tmp/upload-progress-phpt-013 is a symbolic link%s
Hub::run: UploadProgress\Exception: Hub::run(): storage directory /tmp/upload-progress-phpt-013 is a symbolic link%s
phpinfo: refused: storage directory /tmp/upload-progress-phpt-013 is a symbolic link%s
== 0700 again
status: accepted
