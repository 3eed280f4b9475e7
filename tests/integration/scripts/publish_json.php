<?php
// Publishes an array full of JSON edge cases and returns PHP's own json_encode of it,
// so the test can compare what subscribers receive with what json_encode would say.
header('Content-Type: application/json');
$list = [1, 2, 3, 4];
unset($list[3]);                       // still a list: 0, 1, 2
$holes = [10, 20, 30];
unset($holes[1]);                      // keys 0, 2: an object
$ref = ['x' => 1];
$alias = &$ref['x'];                   // a reference inside the array
$alias = 42;
$data = [
    'int' => PHP_INT_MAX, 'neg' => -7, 'float' => 0.1, 'big' => 1.5e300, 'true' => true,
    'false' => false, 'null' => null, 'empty_list' => [], 'list' => $list, 'holes' => $holes,
    'ref' => $ref, 'int_keys' => [5 => 'a', -3 => 'b'], 'nested' => ['a' => ['b' => ['c' => [1, [2, [3]]]]]],
    'escapes' => "quote\" backslash\\ slash/ nl\n tab\t cr\r ctrl\x01\x1f bs\x08 ff\x0c",
    'unicode' => "é 日本 😀", "key \"with\" quotes" => 1, '' => 'empty key', '0' => 'zero key',
];
$ok = UploadProgress\publish('private-upload.jsoncheck', 'custom', $data);
echo json_encode(['ok' => $ok, 'expected' => json_encode($data)]);
