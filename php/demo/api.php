<?php
/**
 * Front controller of the upload_progress demo: every request under /api/ lands here
 * (nginx routes on the raw request URI), whatever its path, so malformed paths, `..`,
 * %2F and bad ids get a JSON answer from this file and never a static file or an nginx
 * error page.
 *
 *   POST   /api/uploads                       {"size":N,"name":"…","sha256"?,"chunk_size"?} → 201
 *   PUT    /api/uploads/{id}/chunks/{index}   raw body, X-Chunk-Checksum: sha256:<hex>     → 200 status
 *   GET    /api/uploads/{id}                                                                → 200 status
 *   POST   /api/uploads/{id}/complete                                                       → 200 status + path
 *   DELETE /api/uploads/{id}                                                                → 204
 *   POST   /api/broadcasting/auth             socket_id, channel_name                       → Pusher auth JSON
 *   GET    /api/config                                                                      → {"key","ws_host","ws_port","ws_path"}
 *
 * Errors: 4xx with {"error": "..."} for anything the client got wrong, 404 for a well
 * formed id that does not exist (on every verb), 405 for a verb a resource does not
 * support; a 5xx only when the server itself fails.
 *
 * Ownership: an upload belongs to the browser session that created it. The session is an
 * HttpOnly cookie holding 128 random bits; the upload's metadata keeps only its SHA-256
 * (`owner`), so no session files, no session lock between parallel chunk requests, and
 * several hosts agree without sharing anything but the upload state. Every endpoint
 * (status, chunk, complete, abort, broadcasting auth) answers 404 for an upload of
 * another session, as if it did not exist. Server paths never go to browsers.
 */

declare(strict_types=1);

namespace UploadProgressDemo;

use Throwable;

const ID_RE = '/^[0-9a-z]{26}$/';
const OWNER_COOKIE = 'upload_owner';
const OWNER_RE = '/^[0-9a-f]{32}$/';
const MAX_JSON_BODY = 65536;

final class HttpError extends \Exception
{
    /** @param array<string,string> $headers */
    public function __construct(public readonly int $status, string $message, public readonly array $headers = [])
    {
        parent::__construct($message);
    }
}

// ---------------------------------------------------------------------------------------
// responses
// ---------------------------------------------------------------------------------------

function send_json(int $status, mixed $body, array $headers = []): void
{
    if (!headers_sent()) {
        http_response_code($status);
        header('Content-Type: application/json; charset=utf-8');
        header('Cache-Control: no-store');
        header('X-Content-Type-Options: nosniff');
        foreach ($headers as $k => $v) {
            header($k . ': ' . $v);
        }
    }
    if ($status === 204 || ($_SERVER['REQUEST_METHOD'] ?? '') === 'HEAD') {
        return;
    }
    echo json_encode($body, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_INVALID_UTF8_SUBSTITUTE | JSON_PRESERVE_ZERO_FRACTION);
}

function send_raw_json(int $status, string $json): void
{
    http_response_code($status);
    header('Content-Type: application/json; charset=utf-8');
    header('Cache-Control: no-store');
    echo $json;
}

/** Shape a status() array for JSON: objects stay objects even when empty. */
function status_json(array $status): array
{
    // The absolute server path is for PHP, not for browsers; the owner hash is ours.
    unset($status['path']);
    if (isset($status['metadata']) && is_array($status['metadata'])) {
        unset($status['metadata']['owner']);
    }
    if (array_key_exists('metadata', $status) && (is_array($status['metadata']) && $status['metadata'] === [])) {
        $status['metadata'] = new \stdClass();
    }
    if (array_key_exists('missing', $status) && is_array($status['missing'])) {
        $status['missing'] = array_values($status['missing']);
    }
    return $status;
}

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

function require_extension(): void
{
    if (!class_exists('UploadProgress\\Upload', false)) {
        throw new HttpError(503, 'the upload_progress extension is not loaded');
    }
}

function valid_id(string $id): string
{
    if (preg_match(ID_RE, $id) !== 1) {
        throw new HttpError(400, sprintf('invalid upload id "%s": expected 26 characters [0-9a-z]', short($id)));
    }
    return $id;
}

function short(string $s, int $max = 64): string
{
    $s = preg_replace('/[^\x20-\x7e]/', '?', $s) ?? '';
    return strlen($s) > $max ? substr($s, 0, $max) . '…' : $s;
}

/** The session's owner token from its cookie, or null when it has none (or a forged one). */
function session_owner(): ?string
{
    $v = $_COOKIE[OWNER_COOKIE] ?? null;
    return is_string($v) && preg_match(OWNER_RE, $v) === 1 ? $v : null;
}

/** The session's owner token, created (and sent as a cookie) when it has none yet. */
function session_owner_or_new(): string
{
    $owner = session_owner();
    if ($owner !== null) {
        return $owner;
    }
    $owner = bin2hex(random_bytes(16));
    [, , $https] = page_host_port();
    setcookie(OWNER_COOKIE, $owner, [
        'path' => '/api/',
        'httponly' => true,
        'samesite' => 'Strict',
        'secure' => $https,
    ]);
    $_COOKIE[OWNER_COOKIE] = $owner;
    return $owner;
}

function owner_hash(string $owner): string
{
    return hash('sha256', $owner);
}

/**
 * Opens an upload of this session. An upload of another session is answered exactly like
 * one that does not exist, so ids cannot be probed.
 */
function open_upload(string $id): \UploadProgress\Upload
{
    require_extension();
    $id = valid_id($id);
    $upload = \UploadProgress\Upload::open($id);
    $owner = session_owner();
    $stored = $upload->status()['metadata']['owner'] ?? null;
    if ($owner === null || !is_string($stored) || !hash_equals($stored, owner_hash($owner))) {
        throw new HttpError(404, sprintf('upload %s not found', $id));
    }
    return $upload;
}

/** @param list<string> $allowed */
function allow(string $method, array $allowed): void
{
    if ($method === 'HEAD' && in_array('GET', $allowed, true)) {
        return;
    }
    if (!in_array($method, $allowed, true)) {
        if (in_array('GET', $allowed, true)) {
            $allowed[] = 'HEAD';
        }
        throw new HttpError(405, sprintf('method %s not allowed here; use %s', short($method, 16), implode(', ', $allowed)), ['Allow' => implode(', ', $allowed)]);
    }
}

function read_body(int $limit): string
{
    $in = fopen('php://input', 'rb');
    if ($in === false) {
        return '';
    }
    $body = stream_get_contents($in, $limit + 1);
    fclose($in);
    if ($body === false) {
        return '';
    }
    if (strlen($body) > $limit) {
        throw new HttpError(413, sprintf('request body over %d bytes', $limit));
    }
    return $body;
}

function json_body(): array
{
    $raw = read_body(MAX_JSON_BODY);
    if (trim($raw) === '') {
        throw new HttpError(400, 'a JSON object body is required');
    }
    try {
        $data = json_decode($raw, true, 32, JSON_THROW_ON_ERROR | JSON_BIGINT_AS_STRING);
    } catch (\JsonException $e) {
        throw new HttpError(400, 'invalid JSON body: ' . $e->getMessage());
    }
    if (!is_array($data) || ($data !== [] && array_is_list($data))) {
        throw new HttpError(400, 'the JSON body must be an object');
    }
    return $data;
}

function ini_bytes(string|false $v): int
{
    if ($v === false) {
        return 0;
    }
    $v = trim($v);
    if ($v === '') {
        return 0;
    }
    if (preg_match('/^(\d+)\s*([kmgt]?)b?$/i', $v, $m) !== 1) {
        return (int)$v;
    }
    $n = (int)$m[1];
    $mult = ['' => 1, 'k' => 1024, 'm' => 1024 ** 2, 'g' => 1024 ** 3, 't' => 1024 ** 4][strtolower($m[2])];
    return $n * $mult;
}

function storage_dir(): string
{
    $dir = (string)ini_get('upload_progress.storage_dir');
    if ($dir === '') {
        // The extension's default: one root per user, never a shared /tmp directory.
        $euid = function_exists('posix_geteuid') ? posix_geteuid() : getmyuid();
        $dir = rtrim(sys_get_temp_dir(), '/') . '/upload-progress-' . $euid;
    }
    return $dir;
}

function free_space(string $dir): ?float
{
    for ($d = $dir; $d !== '' && $d !== '.'; $d = dirname($d)) {
        if (is_dir($d)) {
            $free = @disk_free_space($d);
            return $free === false ? null : $free;
        }
        if ($d === '/') {
            break;
        }
    }
    return null;
}

/** Host and port the page was loaded from (nginx proxies /app/ to the hub on the same origin). */
function page_host_port(): array
{
    $https = (($_SERVER['HTTPS'] ?? '') !== '' && ($_SERVER['HTTPS'] ?? '') !== 'off')
        || strtolower((string)($_SERVER['HTTP_X_FORWARDED_PROTO'] ?? $_SERVER['REQUEST_SCHEME'] ?? '')) === 'https';
    $defaultPort = $https ? 443 : 80;
    $host = (string)($_SERVER['HTTP_HOST'] ?? '');
    if ($host !== '' && preg_match('/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-_]+)(?::(\d{1,5}))?$/', $host, $m) === 1) {
        $port = isset($m[2]) && $m[2] !== '' ? (int)$m[2] : $defaultPort;
        return [$m[1], $port, $https];
    }
    $name = (string)($_SERVER['SERVER_NAME'] ?? '127.0.0.1');
    if ($name === '' || $name === '_') {
        $name = (string)($_SERVER['SERVER_ADDR'] ?? '127.0.0.1');
    }
    return [$name, (int)($_SERVER['SERVER_PORT'] ?? $defaultPort), $https];
}

function app_key(): string
{
    $key = ini_get('upload_progress.app_key');
    return is_string($key) && $key !== '' ? $key : 'upload-progress';
}

function checksum_header(): ?string
{
    $v = $_SERVER['HTTP_X_CHUNK_CHECKSUM'] ?? null;
    if ($v === null) {
        return null;
    }
    $v = trim((string)$v);
    if ($v === '') {
        return null;
    }
    if (preg_match('/^([a-z0-9\-]{1,16}):([0-9a-fA-F]{8,128})$/', $v, $m) !== 1) {
        throw new HttpError(400, sprintf('invalid X-Chunk-Checksum "%s": expected sha256:<64 hex digits>', short($v)));
    }
    if ($m[1] === 'sha256' && strlen($m[2]) !== 64) {
        throw new HttpError(400, sprintf('invalid X-Chunk-Checksum "%s": a sha256 has 64 hex digits', short($v)));
    }
    return strtolower($m[1]) . ':' . strtolower($m[2]);
}

function is_disk_full(Throwable $e): bool
{
    $m = strtolower($e->getMessage());
    return str_contains($m, 'no space') || str_contains($m, 'enospc') || str_contains($m, 'disk full')
        || str_contains($m, 'disk quota') || str_contains($m, 'edquot') || str_contains($m, 'file too large');
}

/** The shared upload state (Redis, several hosts) cannot be reached: worth a retry. */
function is_state_unavailable(Throwable $e): bool
{
    return str_contains($e->getMessage(), 'upload state in Redis');
}

/** Map exceptions of the extension (and PHP's own) to HTTP statuses. */
function status_for(Throwable $e, string $context): int
{
    return match (true) {
        $e instanceof HttpError => $e->status,
        $e instanceof \UploadProgress\NotFoundException => 404,
        $e instanceof \UploadProgress\ChecksumMismatchException => 422,
        // code 409: the upload is complete/aborted; 423: another request writes that chunk.
        $e instanceof \UploadProgress\InvalidChunkException => $context === 'complete' || in_array($e->getCode(), [409, 423], true) ? 409 : 422,
        $e instanceof \UploadProgress\StorageException => is_disk_full($e) ? 507 : (is_state_unavailable($e) ? 503 : 500),
        $e instanceof \ValueError, $e instanceof \InvalidArgumentException, $e instanceof \TypeError,
        $e instanceof \ArgumentCountError => 400,
        // Any other error of the extension is about the state of the upload (e.g. a chunk
        // sent to an upload that is complete or aborted): the client's mistake.
        $e instanceof \UploadProgress\Exception => 409,
        default => 500,
    };
}

// ---------------------------------------------------------------------------------------
// handlers
// ---------------------------------------------------------------------------------------

function create_upload(): void
{
    require_extension();
    $in = json_body();

    $size = $in['size'] ?? null;
    if (is_string($size) && preg_match('/^\d+$/', $size) === 1 && bccomp_gt($size, (string)PHP_INT_MAX)) {
        throw new HttpError(413, sprintf('size %s is over the largest size this server accepts', $size));
    }
    if (!is_int($size)) {
        throw new HttpError(400, '"size" must be an integer number of bytes' . (array_key_exists('size', $in) ? ', got ' . short(json_encode($in['size']) ?: '?') : ''));
    }
    if ($size < 0) {
        throw new HttpError(400, sprintf('"size" must not be negative, got %d', $size));
    }

    $name = $in['name'] ?? '';
    if (!is_string($name)) {
        throw new HttpError(400, '"name" must be a string');
    }
    if (strlen($name) > 1024 || !mb_check_encoding_safe($name) || str_contains($name, "\0")) {
        throw new HttpError(400, '"name" must be valid UTF-8 text of at most 1024 bytes');
    }

    $options = [];
    $metadata = ['name' => $name, 'owner' => owner_hash(session_owner_or_new())];
    if (isset($in['type'])) {
        if (!is_string($in['type']) || strlen($in['type']) > 255) {
            throw new HttpError(400, '"type" must be a string of at most 255 bytes');
        }
        $metadata['type'] = $in['type'];
    }
    $options['metadata'] = $metadata;

    if (array_key_exists('sha256', $in) && $in['sha256'] !== null) {
        if (!is_string($in['sha256']) || preg_match('/^[0-9a-fA-F]{64}$/', $in['sha256']) !== 1) {
            throw new HttpError(400, '"sha256" must be 64 hex digits');
        }
        $options['sha256'] = strtolower($in['sha256']);
    }
    if (array_key_exists('chunk_size', $in) && $in['chunk_size'] !== null) {
        $cs = $in['chunk_size'];
        if (!is_int($cs) || $cs < 1) {
            throw new HttpError(400, '"chunk_size" must be a positive integer number of bytes' . (is_scalar($cs) ? ', got ' . short((string)json_encode($cs)) : ''));
        }
        $options['chunk_size'] = $cs;
    }

    $max = ini_bytes(ini_get('upload_progress.max_upload_size'));
    if ($max > 0 && $size > $max) {
        throw new HttpError(413, sprintf('size %d is over the limit of %d bytes (upload_progress.max_upload_size)', $size, $max));
    }
    $free = free_space(storage_dir());
    if ($free !== null && $size > $free) {
        throw new HttpError(413, sprintf('size %d is over the free space of the storage directory (%.0f bytes)', $size, $free));
    }

    try {
        $upload = \UploadProgress\Upload::create($size, $options);
    } catch (\UploadProgress\StorageException $e) {
        if (is_disk_full($e)) {
            throw new HttpError(507, $e->getMessage());
        }
        throw $e;
    } catch (\UploadProgress\Exception $e) {
        // e.g. over max_upload_size as the extension counts it
        if (stripos($e->getMessage(), 'max_upload_size') !== false || stripos($e->getMessage(), 'too large') !== false) {
            throw new HttpError(413, $e->getMessage());
        }
        throw new HttpError(400, $e->getMessage());
    }

    $id = $upload->id;
    send_json(201, [
        'id' => $id,
        'chunk_size' => $upload->chunkSize,
        'chunk_count' => $upload->chunkCount,
        'total_bytes' => $upload->totalBytes,
        'channel' => 'private-upload.' . $id,
    ], ['Location' => '/api/uploads/' . $id]);
}

function bccomp_gt(string $a, string $b): bool
{
    $a = ltrim($a, '0');
    $b = ltrim($b, '0');
    return strlen($a) !== strlen($b) ? strlen($a) > strlen($b) : strcmp($a, $b) > 0;
}

function mb_check_encoding_safe(string $s): bool
{
    return preg_match('//u', $s) === 1;
}

function put_chunk(string $id, string $indexRaw): void
{
    $upload = open_upload($id);
    if (preg_match('/^\d{1,18}$/', $indexRaw) !== 1) {
        throw new HttpError(400, sprintf('invalid chunk index "%s": expected a non-negative integer', short($indexRaw)));
    }
    $index = (int)$indexRaw;
    if ($index >= $upload->chunkCount) {
        throw new HttpError(400, sprintf('chunk index %d out of range: upload %s has %d chunk(s) (0..%d)', $index, $id, $upload->chunkCount, max(0, $upload->chunkCount - 1)));
    }
    $checksum = checksum_header();
    // null source: the extension streams the request body from the SAPI to the data file.
    try {
        $status = $upload->writeChunk($index, null, $checksum);
    } catch (\UploadProgress\InvalidChunkException $e) {
        // Code 423: another request is writing this chunk right now; nothing was read.
        if ($e->getCode() === 423) {
            throw new HttpError(409, $e->getMessage(), ['Retry-After' => '1']);
        }
        // A chunk for an upload that is no longer uploading is a conflict with its state,
        // not a malformed chunk (docs/client.md): 409.
        if (($upload->status()['state'] ?? 'uploading') !== 'uploading') {
            throw new HttpError(409, $e->getMessage());
        }
        throw $e;
    }
    send_json(200, status_json($status));
}

function get_status(string $id): void
{
    $upload = open_upload($id);
    send_json(200, status_json($upload->status()));
}

function complete_upload(string $id): void
{
    $upload = open_upload($id);
    $upload->complete();
    send_json(200, status_json($upload->status()));
}

function delete_upload(string $id): void
{
    $upload = open_upload($id);
    $upload->abort();
    http_response_code(204);
    header('Cache-Control: no-store');
}

function broadcasting_auth(): void
{
    require_extension();
    $ctype = strtolower((string)($_SERVER['CONTENT_TYPE'] ?? ''));
    if (str_starts_with($ctype, 'application/json')) {
        $in = json_body();
    } else {
        $in = $_POST;
        if ($in === [] && !str_starts_with($ctype, 'multipart/form-data')) {
            parse_str(read_body(MAX_JSON_BODY), $in);
        }
    }
    $socketId = $in['socket_id'] ?? null;
    $channel = $in['channel_name'] ?? null;
    if (!is_string($socketId) || $socketId === '') {
        throw new HttpError(400, 'form field "socket_id" is required');
    }
    if (!is_string($channel) || $channel === '') {
        throw new HttpError(400, 'form field "channel_name" is required');
    }
    if (preg_match('/^\d{1,20}\.\d{1,20}$/', $socketId) !== 1) {
        throw new HttpError(400, sprintf('invalid socket_id "%s"', short($socketId)));
    }
    if (preg_match('/^private-upload\.([0-9a-z]{26})$/D', $channel, $m) !== 1) {
        throw new HttpError(403, sprintf('channel "%s" is not allowed: only private-upload.<id> channels', short($channel)));
    }
    // Only the session that owns the upload may watch it.
    try {
        open_upload($m[1]);
    } catch (HttpError | \UploadProgress\NotFoundException) {
        throw new HttpError(403, sprintf('channel "%s" is not allowed: upload %s is not one of this session\'s', short($channel), $m[1]));
    }
    send_raw_json(200, \UploadProgress\auth($socketId, $channel));
}

function config(): void
{
    [$host, $port, $https] = page_host_port();
    $key = app_key();
    send_json(200, [
        'key' => $key,
        'ws_host' => $host,
        'ws_port' => $port,
        'ws_path' => '',
        'force_tls' => $https,
        'app_path' => '/app/' . $key,
        'auth_endpoint' => '/api/broadcasting/auth',
        'uploads_endpoint' => '/api/uploads',
        'chunk_size' => (int)(ini_get('upload_progress.chunk_size') ?: 8388608),
        'max_upload_size' => ini_bytes(ini_get('upload_progress.max_upload_size')),
        'activity_timeout' => (int)(ini_get('upload_progress.activity_timeout') ?: 30),
        'extension' => function_exists('UploadProgress\\version') ? \UploadProgress\version() : null,
    ]);
}

// ---------------------------------------------------------------------------------------
// routing on the raw request URI
// ---------------------------------------------------------------------------------------

function route(string $method, string $uri): void
{
    $q = strpos($uri, '?');
    $path = $q === false ? $uri : substr($uri, 0, $q);

    if ($path === '/api/uploads') {
        allow($method, ['POST']);
        create_upload();
        return;
    }
    if ($path === '/api/config') {
        allow($method, ['GET']);
        config();
        return;
    }
    if ($path === '/api/broadcasting/auth') {
        allow($method, ['POST']);
        broadcasting_auth();
        return;
    }
    if (preg_match('#^/api/uploads/([^/]*)(/.*)?$#D', $path, $m) === 1) {
        $id = $m[1];
        $rest = $m[2] ?? '';
        if ($rest === '') {
            $allowed = ['GET', 'DELETE'];
        } elseif ($rest === '/complete') {
            $allowed = ['POST'];
        } elseif (preg_match('#^/chunks/([^/]*)$#D', $rest, $c) === 1) {
            $allowed = ['PUT'];
        } else {
            throw new HttpError(404, sprintf('no such endpoint: %s', short($path, 200)));
        }
        // A well-formed id that does not exist is a 404 whatever the verb; a bad id a 400.
        valid_id($id);
        $upload = open_upload($id);
        allow($method, $allowed);
        unset($upload);
        match (true) {
            $rest === '' && ($method === 'GET' || $method === 'HEAD') => get_status($id),
            $rest === '' && $method === 'DELETE' => delete_upload($id),
            $rest === '/complete' => complete_upload($id),
            default => put_chunk($id, $c[1]),
        };
        return;
    }
    throw new HttpError(404, sprintf('no such endpoint: %s', short($path, 200)));
}

function main(): void
{
    set_error_handler(static function (int $no, string $msg, string $file = '', int $line = 0): bool {
        if (!(error_reporting() & $no)) {
            return false;
        }
        throw new \ErrorException($msg, 0, $no, $file, $line);
    });
    $method = strtoupper((string)($_SERVER['REQUEST_METHOD'] ?? 'GET'));
    $uri = (string)($_SERVER['REQUEST_URI'] ?? '/');
    $context = str_ends_with(explode('?', $uri, 2)[0], '/complete') ? 'complete' : '';
    try {
        route($method, $uri);
    } catch (Throwable $e) {
        $status = status_for($e, $context);
        if ($status >= 500) {
            error_log(sprintf('upload_progress demo: %s %s: %s: %s', $method, short($uri, 200), get_class($e), $e->getMessage()));
        }
        $headers = $e instanceof HttpError ? $e->headers : [];
        $message = $e->getMessage();
        if ($message === '') {
            $message = get_class($e);
        }
        $body = ['error' => $message];
        if (isset($headers['Retry-After'])) {
            // Browsers' fetch sees the body more easily than the header: say it in both.
            $body['retry_after'] = (int)$headers['Retry-After'];
        }
        send_json($status, $body, $headers);
    }
}

main();
