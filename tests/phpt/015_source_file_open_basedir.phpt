--TEST--
writeChunk($sourceFile) honours open_basedir like file_get_contents(), and its error reveals neither existence nor size
--DESCRIPTION--
Attacker: a script limited by open_basedir stores /etc/passwd as a chunk (old code read it,
and the length error leaked its size).
--INI--
upload_progress.hub=off
--FILE--
<?php
use UploadProgress\Upload;
function attempt(string $what, callable $f) {
    try { $f(); echo "$what: accepted\n"; }
    catch (Throwable $e) { echo "$what: ", get_class($e), ': ', $e->getMessage(), "\n"; }
}
$u = Upload::create(100000, ['chunk_size' => 100000]);
ini_set('open_basedir', sys_get_temp_dir());
ini_set('display_errors', '0');
attempt('file_get_contents', fn() => var_dump(file_get_contents('/etc/passwd')));
echo 'PHP: ', error_get_last()['message'], "\n";
error_clear_last();
attempt('existing file', fn() => $u->writeChunk(0, '/etc/passwd'));
echo 'PHP: ', error_get_last()['message'], "\n";
attempt('missing file', fn() => $u->writeChunk(0, '/etc/no-such-file-here'));
$s = $u->status();
echo 'bytes_done=', $s['bytes_done'], "\n";
$tmp = tempnam(sys_get_temp_dir(), 'c');
file_put_contents($tmp, str_repeat('x', 100000));
attempt('allowed file', fn() => $u->writeChunk(0, $tmp)['bytes_done']);
unlink($tmp);
?>
--EXPECTF--
bool(false)
file_get_contents: accepted
PHP: file_get_contents(/etc/passwd): Failed to open stream: Operation not permitted
existing file: UploadProgress\StorageException: cannot open source file "/etc/passwd": open_basedir restriction in effect
PHP: %Sopen_basedir restriction in effect. File(/etc/passwd) is not within the allowed path(s): (%s)
missing file: UploadProgress\StorageException: cannot open source file "/etc/no-such-file-here": open_basedir restriction in effect
bytes_done=0
allowed file: accepted
