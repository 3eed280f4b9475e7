<?php
// Baseline of chunked uploads in plain PHP: each chunk is copied from php://input into
// its own file, the chunks are merged into one file at the end.
//   PUT  /t/plain_chunks.php?id=<id>&i=<index>   raw body
//   POST /t/plain_chunks.php?id=<id>&merge=<n>   → path of the merged file
$id = $_GET['id'] ?? '';
if (!preg_match('/^[0-9a-z]{1,40}$/', $id)) { http_response_code(400); exit('bad id'); }
$dir = sys_get_temp_dir() . '/plain/' . $id;
if (!is_dir($dir)) { @mkdir($dir, 0700, true); }
if ($_SERVER['REQUEST_METHOD'] === 'PUT') {
    $i = (int)($_GET['i'] ?? -1);
    if ($i < 0) { http_response_code(400); exit('bad index'); }
    $n = file_put_contents("$dir/$i.part", fopen('php://input', 'rb'));
    if ($n === false) { http_response_code(500); exit('write failed'); }
    echo $n;
    exit;
}
if (isset($_GET['merge'])) {
    $count = (int)$_GET['merge'];
    $out = fopen("$dir/file", 'wb');
    for ($i = 0; $i < $count; $i++) {
        $in = fopen("$dir/$i.part", 'rb');
        if ($in === false) { http_response_code(409); exit("missing chunk $i"); }
        stream_copy_to_stream($in, $out);
        fclose($in);
        unlink("$dir/$i.part");
    }
    fclose($out);
    echo "$dir/file";
    exit;
}
http_response_code(405);
