--TEST--
A timeout (bailout) inside writeChunk's body read releases the chunk lock and descriptors: the same chunk can be written again at once
--DESCRIPTION--
Attacker: makes the body read of writeChunk hit max_execution_time (here: php://input
replaced by a wrapper that spins until the time limit). The timeout's longjmp skipped the
Rust cleanup and old code kept the chunk's OFD lock (and its files) for the life of the
worker: the next writer of that chunk waited forever (here, in the shutdown function of the
same process). A memory_limit error is not enough: PHP turns it into an unwind there.
--CGI--
--ENV--
UPLOAD_PROGRESS_LOCK_WAIT_MS=3000
--POST_RAW--
Content-Type: application/x-www-form-urlencoded
0123456789abcdef
--INI--
upload_progress.hub=off
display_errors=1
html_errors=0
--FILE--
<?php
use UploadProgress\Upload;
final class Exhausting {
    public $context;
    function stream_open($path, $mode, $options, &$opened) { return true; }
    function stream_read($n) { set_time_limit(1); for (;;) {} } // fatal: timeout, a longjmp
    function stream_eof() { return false; }
    function stream_stat() { return []; }
}
$u = Upload::create(16, ['chunk_size' => 16]);
register_shutdown_function(function () use ($u) {
    $tmp = tempnam(sys_get_temp_dir(), 'c');
    file_put_contents($tmp, '0123456789abcdef');
    $t = microtime(true);
    $open = array_filter(array_map(fn($f) => @readlink($f), glob('/proc/self/fd/*')), fn($l) => str_contains((string)$l, $u->id));
    echo "\nfiles of the upload still open: ", count($open), "\n";
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
%AFatal error: Maximum execution time of 1 second exceeded%s

files of the upload still open: 0

after the fatal error: stored=1 in under 1 s
