<?php
/**
 * A PHP stand-in for the upload_progress extension's Upload API, used ONLY to exercise the
 * demo (api.php, app.js, the JS client) and the browser tests before the Rust extension
 * builds. Loaded with auto_prepend_file; inert when the real extension is loaded.
 *
 * Storage: <upload_progress.storage_dir>/<id>/{data,manifest.json}. Events go to a mock hub
 * (tests/browser/mock/hub.mjs) over its HTTP API: POST /apps/mock/events.
 */

namespace UploadProgress;

if (!class_exists('UploadProgress\\Upload', false)) {

class Exception extends \RuntimeException {}
class NotFoundException extends Exception {}
class InvalidChunkException extends Exception {}
class ChecksumMismatchException extends Exception {}
class StorageException extends Exception {}

function version(): string
{
    return '0.0.0-mock';
}

function mock_cfg(string $name, string $default = ''): string
{
    $v = get_cfg_var('upload_progress.' . $name);
    return is_string($v) && $v !== '' ? $v : $default;
}

function auth(string $socketId, string $channel, ?string $channelData = null): string
{
    if (!preg_match('/^\d+\.\d+$/', $socketId) || $channel === '') {
        throw new \InvalidArgumentException("invalid socket id \"$socketId\" or channel \"$channel\"");
    }
    $key = mock_cfg('app_key', 'upload-progress');
    $sig = hash_hmac('sha256', $socketId . ':' . $channel . ($channelData !== null ? ':' . $channelData : ''), mock_cfg('app_secret', 'mock-secret'));
    $out = ['auth' => $key . ':' . $sig];
    if ($channelData !== null) {
        $out['channel_data'] = $channelData;
    }
    return json_encode($out);
}

function mock_publish(string $channel, string $event, array $data): bool
{
    $listen = mock_cfg('listen', '127.0.0.1:6001');
    [$host, $port] = explode(':', $listen) + [1 => '6001'];
    $fp = @stream_socket_client("tcp://$host:$port", $errno, $errstr, 0.05);
    if (!$fp) {
        return false;
    }
    $body = json_encode(['name' => $event, 'channel' => $channel, 'data' => json_encode($data)]);
    fwrite($fp, "POST /apps/mock/events HTTP/1.1\r\nHost: $listen\r\nContent-Type: application/json\r\nContent-Length: " . strlen($body) . "\r\nConnection: close\r\n\r\n" . $body);
    stream_set_timeout($fp, 0, 200000);
    fread($fp, 256);
    fclose($fp);
    return true;
}

final class Upload
{
    public readonly string $id;
    public readonly int $totalBytes;
    public readonly int $chunkSize;
    public readonly int $chunkCount;
    private string $dir;

    private function __construct(string $id, array $m)
    {
        $this->id = $id;
        $this->totalBytes = $m['total_bytes'];
        $this->chunkSize = $m['chunk_size'];
        $this->chunkCount = $m['chunk_count'];
        $this->dir = self::root() . '/' . $id;
    }

    private static function root(): string
    {
        $d = mock_cfg('storage_dir', sys_get_temp_dir() . '/upload-progress');
        if (!is_dir($d)) {
            @mkdir($d, 0700, true);
        }
        return $d;
    }

    public static function create(int $totalBytes, array $options = []): Upload
    {
        if ($totalBytes < 0) {
            throw new \ValueError("totalBytes must be >= 0, got $totalBytes");
        }
        $cs = $options['chunk_size'] ?? (int)mock_cfg('chunk_size', '8388608');
        if (!is_int($cs) || $cs < 1) {
            throw new \ValueError('chunk_size must be a positive integer');
        }
        $alphabet = '0123456789abcdefghijklmnopqrstuvwxyz';
        $id = '';
        for ($i = 0; $i < 26; $i++) {
            $id .= $alphabet[random_int(0, 35)];
        }
        $count = $totalBytes === 0 ? 1 : intdiv($totalBytes + $cs - 1, $cs);
        $m = [
            'id' => $id, 'state' => 'uploading', 'total_bytes' => $totalBytes, 'chunk_size' => $cs,
            'chunk_count' => $count, 'stored' => [], 'metadata' => $options['metadata'] ?? [],
            'sha256' => $options['sha256'] ?? null, 'created_at' => time(), 'expires_at' => time() + 86400, 'seq' => 0,
        ];
        $dir = self::root() . '/' . $id;
        if (!@mkdir($dir, 0700, true)) {
            throw new StorageException("cannot create $dir");
        }
        $f = fopen("$dir/data", 'c');
        ftruncate($f, $totalBytes);
        fclose($f);
        file_put_contents("$dir/manifest.json", json_encode($m));
        return new Upload($id, $m);
    }

    public static function open(string $id): Upload
    {
        $file = self::root() . '/' . $id . '/manifest.json';
        if (!preg_match('/^[0-9a-z]{26}$/', $id) || !is_file($file)) {
            throw new NotFoundException("upload \"$id\" not found");
        }
        return new Upload($id, json_decode(file_get_contents($file), true));
    }

    private function withManifest(callable $fn): mixed
    {
        $lock = fopen($this->dir . '/lock', 'c');
        if ($lock === false) {
            throw new NotFoundException("upload \"{$this->id}\" not found");
        }
        flock($lock, LOCK_EX);
        try {
            $file = $this->dir . '/manifest.json';
            if (!is_file($file)) {
                throw new NotFoundException("upload \"{$this->id}\" not found");
            }
            $m = json_decode(file_get_contents($file), true);
            $r = $fn($m);
            file_put_contents("$file.tmp", json_encode($m));
            rename("$file.tmp", $file);
            return $r;
        } finally {
            flock($lock, LOCK_UN);
            fclose($lock);
        }
    }

    private function chunkLen(int $index): int
    {
        if ($index === $this->chunkCount - 1) {
            return $this->totalBytes - $index * $this->chunkSize;
        }
        return $this->chunkSize;
    }

    private function nextSeq(): int
    {
        return $this->withManifest(function (array &$m) { return ++$m['seq']; });
    }

    public function writeChunk(int $index, ?string $sourceFile = null, ?string $checksum = null): array
    {
        if ($index < 0 || $index >= $this->chunkCount) {
            throw new InvalidChunkException("chunk index $index out of range 0.." . ($this->chunkCount - 1));
        }
        $st = $this->status();
        if ($st['state'] !== 'uploading') {
            throw new Exception("upload {$this->id} is {$st['state']}");
        }
        $expect = $this->chunkLen($index);
        $in = fopen($sourceFile ?? 'php://input', 'rb');
        $out = fopen($this->dir . '/data', 'c');
        fseek($out, $index * $this->chunkSize);
        $ctx = hash_init('sha256');
        $n = 0;
        $lastEvent = 0.0;
        $base = $st['bytes_done'];
        $started = microtime(true);
        while (!feof($in)) {
            $buf = fread($in, 262144);
            if ($buf === false || $buf === '') {
                break;
            }
            $n += strlen($buf);
            if ($n > $expect) {
                break;
            }
            hash_update($ctx, $buf);
            fwrite($out, $buf);
            $now = microtime(true);
            if ($now - $lastEvent >= 0.1) {
                $lastEvent = $now;
                $done = min($this->totalBytes, $base + $n);
                $rate = $n / max(0.001, $now - $started);
                mock_publish('private-upload.' . $this->id, 'progress', [
                    'upload_id' => $this->id, 'seq' => $this->nextSeq(), 'state' => 'uploading',
                    'bytes_done' => $done, 'bytes_total' => $this->totalBytes,
                    'chunks_done' => count($st['missing']) ? $this->chunkCount - count($st['missing']) : $this->chunkCount,
                    'chunk_count' => $this->chunkCount, 'rate_bps' => (int)$rate,
                    'eta_s' => $rate > 0 ? ($this->totalBytes - $done) / $rate : null, 'ts_ms' => (int)($now * 1000),
                ]);
            }
        }
        fclose($in);
        fflush($out);
        fclose($out);
        if ($n !== $expect) {
            throw new InvalidChunkException("chunk $index has $n bytes, expected $expect");
        }
        if ($checksum !== null) {
            if (!str_starts_with($checksum, 'sha256:')) {
                throw new \ValueError("unsupported checksum \"$checksum\"");
            }
            $got = hash_final($ctx);
            if (!hash_equals(substr($checksum, 7), $got)) {
                throw new ChecksumMismatchException("chunk $index: checksum $checksum does not match sha256:$got");
            }
        }
        $this->withManifest(function (array &$m) use ($index) {
            $m['stored'][(string)$index] = true;
        });
        $status = $this->status();
        mock_publish('private-upload.' . $this->id, 'progress', [
            'upload_id' => $this->id, 'seq' => $this->nextSeq(), 'state' => 'uploading',
            'bytes_done' => $status['bytes_done'], 'bytes_total' => $this->totalBytes,
            'chunks_done' => $status['chunks_done'], 'chunk_count' => $this->chunkCount,
            'rate_bps' => null, 'eta_s' => null, 'ts_ms' => (int)(microtime(true) * 1000),
        ]);
        return $status;
    }

    public function status(): array
    {
        $file = $this->dir . '/manifest.json';
        if (!is_file($file)) {
            throw new NotFoundException("upload \"{$this->id}\" not found");
        }
        $m = json_decode(file_get_contents($file), true);
        $missing = [];
        $bytes = 0;
        for ($i = 0; $i < $this->chunkCount; $i++) {
            if (isset($m['stored'][(string)$i])) {
                $bytes += $this->chunkLen($i);
            } else {
                $missing[] = $i;
            }
        }
        $s = [
            'id' => $this->id, 'state' => $m['state'], 'total_bytes' => $this->totalBytes,
            'chunk_size' => $this->chunkSize, 'chunk_count' => $this->chunkCount,
            'chunks_done' => $this->chunkCount - count($missing), 'bytes_done' => $bytes, 'missing' => $missing,
            'metadata' => $m['metadata'], 'created_at' => $m['created_at'], 'expires_at' => $m['expires_at'],
        ];
        if ($m['state'] === 'complete') {
            $s['path'] = $this->dir . '/data';
        }
        return $s;
    }

    public function complete(): string
    {
        $st = $this->status();
        if ($st['state'] === 'complete') {
            return $st['path'];
        }
        if ($st['missing']) {
            throw new InvalidChunkException('missing chunks: ' . implode(',', array_slice($st['missing'], 0, 20)));
        }
        $this->withManifest(function (array &$m) {
            $m['state'] = 'complete';
        });
        $path = $this->dir . '/data';
        mock_publish('private-upload.' . $this->id, 'complete', [
            'upload_id' => $this->id, 'seq' => $this->nextSeq(), 'state' => 'complete',
            'bytes_total' => $this->totalBytes, 'path' => $path, 'ts_ms' => (int)(microtime(true) * 1000),
        ]);
        return $path;
    }

    public function abort(): void
    {
        $seq = $this->nextSeq();
        foreach (['data', 'manifest.json', 'lock'] as $f) {
            @unlink($this->dir . '/' . $f);
        }
        @rmdir($this->dir);
        mock_publish('private-upload.' . $this->id, 'aborted', [
            'upload_id' => $this->id, 'seq' => $seq, 'state' => 'aborted', 'ts_ms' => (int)(microtime(true) * 1000),
        ]);
    }
}

}
