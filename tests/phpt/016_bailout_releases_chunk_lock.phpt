--TEST--
A fatal error (bailout) inside writeChunk's body read releases the chunk lock: the same chunk can be written again at once
--DESCRIPTION--
Attacker: makes the body read of writeChunk die with a fatal error (here: php://input
replaced by a wrapper that exhausts memory_limit). The longjmp skipped the Rust cleanup and
old code kept the chunk's OFD lock for the life of the worker: the next writer of that chunk
waited forever (here, in the shutdown function of the same process).
--CGI--
--ENV--
UPLOAD_PROGRESS_LOCK_WAIT_MS=3000
--POST_RAW--
Content-Type: application/x-www-form-urlencoded
0123456789abcdef
--INI--
upload_progress.hub=off
memory_limit=32M
display_errors=1
html_errors=0
--FILE--
<?php
use UploadProgress\Upload;
final class Exhausting {
    public $context;
    function stream_open($path, $mode, $options, &$opened) { return true; }
    function stream_read($n) { return str_repeat('x', 1 << 30); } // fatal: memory_limit
    function stream_eof() { return false; }
    function stream_stat() { return []; }
}
$u = Upload::create(16, ['chunk_size' => 16]);
register_shutdown_function(function () use ($u) {
    $tmp = tempnam(sys_get_temp_dir(), 'c');
    file_put_contents($tmp, '0123456789abcdef');
    $t = microtime(true);
    try {
        $s = $u->writeChunk(0, $tmp);
        printf("\nafter the fatal error: stored=%d in %s\n", $s['chunks_done'], microtime(true) - $t < 1 ? 'under 1 s' : 'too long');
    } catch (Throwable $e) {
        echo "\nafter the fatal error: ", get_class($e), ': ', $e->getMessage(), "\n";
    }
    unlink($tmp);
    $u->abort();
});
stream_wrapper_unregister('php');
stream_wrapper_register('php', Exhausting::class);
$u->writeChunk(0);
echo "not reached\n";
?>
--EXPECTF--
%AFatal error: Allowed memory size of %d bytes exhausted%s

after the fatal error: stored=1 in under 1 s
