--TEST--
Upload: every error is the contract's exception and names the offending value; nothing stored is lost
--INI--
upload_progress.hub=off
upload_progress.max_upload_size=1000000
--FILE--
<?php
use UploadProgress\Upload;
function attempt(string $what, callable $f) {
    try { $f(); echo "$what: accepted\n"; }
    catch (Throwable $e) { echo "$what: ", get_class($e), ': ', $e->getMessage(), "\n"; }
}
attempt('zero size', fn() => Upload::create(0));
attempt('negative size', fn() => Upload::create(-5));
attempt('over max_upload_size', fn() => Upload::create(1000001));
attempt('bad chunk_size', fn() => Upload::create(10, ['chunk_size' => -1]));
attempt('unknown option', fn() => Upload::create(10, ['colour' => 'red']));
attempt('bad sha256', fn() => Upload::create(10, ['sha256' => 'xyz']));
attempt('traversal id', fn() => Upload::open('../../etc/passwd'));
attempt('unknown id', fn() => Upload::open(str_repeat('a', 26)));
$u = Upload::create(10, ['chunk_size' => 4]);
$tmp = tempnam(sys_get_temp_dir(), 'c');
file_put_contents($tmp, 'abcd');
$u->writeChunk(0, $tmp);
attempt('index 3', fn() => $u->writeChunk(3, $tmp));
attempt('index -1', fn() => $u->writeChunk(-1, $tmp));
file_put_contents($tmp, 'abc');
attempt('short chunk', fn() => $u->writeChunk(1, $tmp));
file_put_contents($tmp, 'abcde');
attempt('long chunk', fn() => $u->writeChunk(1, $tmp));
file_put_contents($tmp, 'efgh');
attempt('bad checksum', fn() => $u->writeChunk(1, $tmp, 'sha256:' . str_repeat('0', 64)));
attempt('checksum format', fn() => $u->writeChunk(1, $tmp, 'md5:abc'));
attempt('missing source', fn() => $u->writeChunk(1, '/nonexistent/file'));
attempt('complete with missing chunks', fn() => $u->complete());
$s = $u->status();
echo 'still stored: ', json_encode($s['missing']), ' bytes_done=', $s['bytes_done'], "\n";
$w = Upload::create(4, ['sha256' => str_repeat('a', 64)]);
file_put_contents($tmp, 'wxyz');
$w->writeChunk(0, $tmp);
attempt('whole-file sha256', fn() => $w->complete());
unlink($tmp);
?>
--EXPECTF--
zero size: ValueError: %s0%s
negative size: ValueError: %s-5%s
over max_upload_size: ValueError: %s1000001%s
bad chunk_size: ValueError: %schunk_size%s
unknown option: ValueError: %scolour%s
bad sha256: ValueError: %sxyz%s
traversal id: UploadProgress\NotFoundException: %s../../etc/passwd%s
unknown id: UploadProgress\NotFoundException: %saaaaaaaaaaaaaaaaaaaaaaaaaa%s
index 3: UploadProgress\InvalidChunkException: %s3%s
index -1: UploadProgress\InvalidChunkException: %s-1%s
short chunk: UploadProgress\InvalidChunkException: %s3%s
long chunk: UploadProgress\InvalidChunkException: %s
bad checksum: UploadProgress\ChecksumMismatchException: %s0000000000%s
checksum format: ValueError: %smd5:abc%s
missing source: UploadProgress\StorageException: %s/nonexistent/file%s
complete with missing chunks: UploadProgress\InvalidChunkException: %s1, 2
still stored: [1,2] bytes_done=4
whole-file sha256: UploadProgress\ChecksumMismatchException: %saaaa%s
