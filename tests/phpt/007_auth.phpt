--TEST--
auth() signs private and presence channels like Pusher; malformed input throws InvalidArgumentException
--INI--
upload_progress.app_key=278d425bdf160c739803
upload_progress.app_secret=7ad3773142a6692b25b8
--FILE--
<?php
use function UploadProgress\auth;
echo auth('1234.1234', 'private-foobar'), "\n";
$p = json_decode(auth('1234.1234', 'presence-room', '{"user_id":"10"}'), true);
echo $p['channel_data'], "\n";
var_dump(hash_equals('278d425bdf160c739803:' . hash_hmac('sha256', '1234.1234:presence-room:{"user_id":"10"}', '7ad3773142a6692b25b8'), $p['auth']));
foreach ([['bad', 'private-x', null], ['1.1', 'bad channel', null], ['1.1', 'presence-x', null], ['1.1', 'presence-x', 'not json']] as [$s, $c, $d]) {
    try { auth($s, $c, $d); echo "accepted\n"; }
    catch (InvalidArgumentException $e) { echo "InvalidArgumentException\n"; }
}
?>
--EXPECT--
{"auth":"278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"}
{"user_id":"10"}
bool(true)
InvalidArgumentException
InvalidArgumentException
InvalidArgumentException
InvalidArgumentException
