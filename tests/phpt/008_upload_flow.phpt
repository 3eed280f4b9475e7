--TEST--
Upload: create, write chunks from files in any order, status, complete (idempotent), abort
--INI--
upload_progress.hub=off
--FILE--
<?php
use UploadProgress\Upload;
$data = random_bytes(10000);
$u = Upload::create(strlen($data), ['chunk_size' => 4096, 'metadata' => ['name' => 'a.bin'], 'sha256' => hash('sha256', $data)]);
var_dump((bool) preg_match('/^[0-9a-z]{26}$/', $u->id), $u->totalBytes, $u->chunkSize, $u->chunkCount);
$tmp = tempnam(sys_get_temp_dir(), 'chunk');
foreach ([2, 0, 1, 1] as $i) {
    $chunk = substr($data, $i * 4096, 4096);
    file_put_contents($tmp, $chunk);
    $s = $u->writeChunk($i, $tmp, 'sha256:' . hash('sha256', $chunk));
    echo "chunk $i: done={$s['chunks_done']} missing=", json_encode($s['missing']), "\n";
}
$s = Upload::open($u->id)->status();
foreach (['id','state','total_bytes','chunk_size','chunk_count','chunks_done','bytes_done','missing','metadata','created_at','expires_at'] as $k) {
    if (!array_key_exists($k, $s)) echo "missing key $k\n";
}
echo $s['state'], ' ', $s['bytes_done'], ' ', $s['metadata']['name'], ' ', $s['expires_at'] > $s['created_at'] ? 'expires later' : 'WRONG', "\n";
$path = $u->complete();
var_dump($path[0] === '/', hash_file('sha256', $path) === hash('sha256', $data), $u->complete() === $path);
$s = $u->status();
echo $s['state'], ' ', $s['path'] === $path ? 'path in status' : 'no path', "\n";
try { $u->writeChunk(0, $tmp); echo "rewrite after complete accepted\n"; } catch (UploadProgress\Exception $e) { echo get_class($e), "\n"; }
$v = Upload::create(5);
$v->abort();
try { Upload::open($v->id); } catch (UploadProgress\NotFoundException $e) { echo "aborted upload is gone\n"; }
unlink($tmp);
try { $x = new Upload(); echo "constructed\n"; } catch (Throwable $e) { echo "no public constructor\n"; }
?>
--EXPECTF--
bool(true)
int(10000)
int(4096)
int(3)
chunk 2: done=1 missing=[0,1]
chunk 0: done=2 missing=[1]
chunk 1: done=3 missing=[]
chunk 1: done=3 missing=[]
uploading 10000 a.bin expires later
bool(true)
bool(true)
bool(true)
complete path in status
%s
aborted upload is gone
no public constructor
