<?php
// Reads the request body (php://input) and discards it; answers the byte count.
$in = fopen('php://input', 'rb');
$n = 0;
while (!feof($in)) {
    $s = fread($in, 1 << 20);
    if ($s === false) break;
    $n += strlen($s);
}
header('Content-Type: text/plain');
echo $n;
