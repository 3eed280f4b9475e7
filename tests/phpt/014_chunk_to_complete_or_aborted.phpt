--TEST--
A chunk sent to a complete or aborted upload is an InvalidChunkException with code 409, whatever its length or checksum; the finished file is unchanged
--DESCRIPTION--
Attacker/client bug: re-sends chunks (wrong length, wrong checksum) after completion, or to
an upload this object aborted. Old code answered "already stored" (200 in the demo) without
looking at the body, or NotFound.
--INI--
upload_progress.hub=off
--FILE--
<?php
use UploadProgress\Upload;
function attempt(string $what, callable $f) {
    try { $f(); echo "$what: accepted\n"; }
    catch (Throwable $e) { echo "$what: ", get_class($e), ' code ', $e->getCode(), ': ', $e->getMessage(), "\n"; }
}
$tmp = tempnam(sys_get_temp_dir(), 'c');
$u = Upload::create(8, ['chunk_size' => 4]);
file_put_contents($tmp, 'abcd'); $u->writeChunk(0, $tmp);
file_put_contents($tmp, 'efgh'); $u->writeChunk(1, $tmp);
$path = $u->complete();
file_put_contents($tmp, 'way too long for a chunk');
attempt('wrong length after complete', fn() => $u->writeChunk(1, $tmp));
file_put_contents($tmp, 'EFGH');
attempt('bad checksum after complete', fn() => $u->writeChunk(1, $tmp, 'sha256:' . str_repeat('0', 64)));
attempt('same bytes after complete', fn() => $u->writeChunk(0, $tmp));
echo 'file: ', file_get_contents($path), "\n";
$v = Upload::create(8, ['chunk_size' => 4]);
$v->abort();
attempt('chunk after abort', fn() => $v->writeChunk(0, $tmp));
attempt('chunk with a bad length (not a conflict)', function () use ($tmp) {
    $w = Upload::create(8, ['chunk_size' => 4]);
    file_put_contents($tmp, 'abc');
    $w->writeChunk(0, $tmp);
});
unlink($tmp);
?>
--EXPECTF--
wrong length after complete: UploadProgress\InvalidChunkException code 409: upload %s is complete: chunk 1 was not accepted%s
bad checksum after complete: UploadProgress\InvalidChunkException code 409: upload %s is complete: chunk 1 was not accepted%s
same bytes after complete: UploadProgress\InvalidChunkException code 409: upload %s is complete: chunk 0 was not accepted%s
file: abcdefgh
chunk after abort: UploadProgress\InvalidChunkException code 409: upload %s was aborted: chunk 0 was not accepted
chunk with a bad length (not a conflict): UploadProgress\InvalidChunkException code 0: chunk 0 of upload %s has 3 bytes, expected 4
