--TEST--
publish() rejects invalid channel and event names and oversized data with ValueError; returns false without a hub
--INI--
upload_progress.hub=external
upload_progress.hub_socket=@upload-progress-phpt-no-hub
--FILE--
<?php
use function UploadProgress\publish;
$tries = [
    ['bad channel!', 'e', 'x'],
    [str_repeat('c', 165), 'e', 'x'],
    ['', 'e', 'x'],
    ['ok', 'pusher:subscribe', 'x'],
    ['ok', '', 'x'],
    ['ok', 'e', str_repeat('x', 10241)],
    ['ok', 'e', ['nan' => NAN]],
];
foreach ($tries as [$c, $e, $d]) {
    try { publish($c, $e, $d); echo "accepted\n"; }
    catch (ValueError $ex) { echo 'ValueError: ', substr($ex->getMessage(), 0, 60), "\n"; }
}
var_dump(publish('private-upload.abc', 'progress', ['a' => 1]));
var_dump(publish('updates', 'e', 'plain string'));
var_dump(UploadProgress\hub_status()['events_dropped'] >= 2);
?>
--EXPECTF--
ValueError: %sbad channel!%s
ValueError: %s
ValueError: %s
ValueError: %spusher:subscribe%s
ValueError: %s
ValueError: %s10241%s
ValueError: %s
bool(false)
bool(false)
bool(true)
