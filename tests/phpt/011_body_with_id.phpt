--TEST--
a request whose query carries the progress id is observed (events attempted) and still parsed correctly
--INI--
upload_progress.hub=external
upload_progress.hub_socket=@upload-progress-phpt-with-id
file_uploads=1
--GET--
X-Progress-ID=abc123
--POST_RAW--
Content-Type: multipart/form-data; boundary=---------------------------20896060251896012921717172737
-----------------------------20896060251896012921717172737
Content-Disposition: form-data; name="file"; filename="b.txt"
Content-Type: text/plain

some bytes
-----------------------------20896060251896012921717172737--
--FILE--
<?php
echo $_FILES['file']['name'], ' ', file_get_contents($_FILES['file']['tmp_name']), "\n";
var_dump(UploadProgress\hub_status()['events_dropped'] > 0);
?>
--EXPECT--
b.txt some bytes
bool(true)
