<?php
// Test helper of test_shared_host_storage.py: the Upload API with every exception reported
// as JSON {class, code, message} (the demo maps them to HTTP statuses on its own).
use UploadProgress\Upload;

/** php://input replaced by this wrapper: its read hits the time limit (a bailout, a longjmp;
 * a memory_limit error would be turned into an unwind by PHP there). */
final class Exhausting
{
    public $context;
    public function stream_open($path, $mode, $options, &$opened) { return true; }
    public function stream_read($n) { set_time_limit(1); for (;;) {} }
    public function stream_eof() { return false; }
    public function stream_stat() { return []; }
}

header('Content-Type: application/json');
try {
    switch ($_GET['op'] ?? '') {
        case 'create':
            $u = Upload::create((int)$_GET['size'], ['chunk_size' => (int)$_GET['chunk']]);
            echo json_encode(['id' => $u->id]);
            break;
        case 'put':
            $u = Upload::open((string)$_GET['id']);
            if (($_GET['bail'] ?? '') === '1') {
                stream_wrapper_unregister('php');
                stream_wrapper_register('php', Exhausting::class);
            }
            $s = $u->writeChunk((int)$_GET['index'], null, $_SERVER['HTTP_X_CHUNK_CHECKSUM'] ?? null);
            echo json_encode(['status' => $s]);
            break;
        case 'complete':
            $u = Upload::open((string)$_GET['id']);
            echo json_encode(['path' => $u->complete()]);
            break;
        case 'auth':
            echo UploadProgress\auth('1234.5678', 'private-upload.x');
            break;
        default:
            http_response_code(404);
            echo json_encode(['error' => 'unknown op']);
    }
} catch (Throwable $e) {
    http_response_code(400);
    echo json_encode(['class' => get_class($e), 'code' => $e->getCode(), 'message' => $e->getMessage()]);
}
