--TEST--
every directive of the contract is registered with its default and shown by php --ri
--INI--
upload_progress.storage_dir=
upload_progress.hub=auto
--FILE--
<?php
$defaults = [
    'upload_progress.enabled' => '1',
    'upload_progress.storage_dir' => '',
    'upload_progress.hub' => 'auto',
    'upload_progress.listen' => '127.0.0.1:6001',
    'upload_progress.hub_socket' => '',
    'upload_progress.app_id' => '',
    'upload_progress.app_key' => '',
    'upload_progress.app_secret' => '',
    'upload_progress.allowed_origins' => '',
    'upload_progress.progress_param' => 'X-Progress-ID',
    'upload_progress.min_interval_ms' => '100',
    'upload_progress.chunk_size' => '8388608',
    'upload_progress.max_upload_size' => '0',
    'upload_progress.expire_seconds' => '86400',
    'upload_progress.activity_timeout' => '30',
    'upload_progress.max_connections' => '0',
    'upload_progress.max_pending_handshakes' => '0',
    'upload_progress.max_connections_per_ip' => '256',
    'upload_progress.handshake_timeout' => '10',
    'upload_progress.redis_url' => '',
];
$all = ini_get_all('upload_progress');
foreach ($defaults as $name => $default) {
    if (!isset($all[$name])) { echo "missing $name\n"; continue; }
    if ($all[$name]['global_value'] !== $default) echo "$name default is {$all[$name]['global_value']}\n";
    if ($all[$name]['access'] !== INI_SYSTEM) echo "$name is not PHP_INI_SYSTEM\n";
}
ob_start();
$ext = new ReflectionExtension('upload_progress');
$ext->info();
$info = ob_get_clean();
foreach (array_keys($defaults) as $name) {
    if (strpos($info, $name) === false) echo "php --ri does not show $name\n";
}
echo strpos($info, UploadProgress\version()) !== false ? "version shown\n" : "version missing\n";
echo preg_match('/hub\s*=>\s*(not running|running)/', $info) ? "hub state shown\n" : "hub state missing\n";
var_dump(ini_set('upload_progress.listen', '1.2.3.4:1'));
?>
--EXPECT--
version shown
hub state shown
bool(false)
