--TEST--
a multipart request without a progress id is untouched: same $_FILES and $_POST, nothing sent to the hub
--INI--
upload_progress.hub=external
upload_progress.hub_socket=@upload-progress-phpt-untouched
file_uploads=1
--POST_RAW--
Content-Type: multipart/form-data; boundary=---------------------------20896060251896012921717172737
-----------------------------20896060251896012921717172737
Content-Disposition: form-data; name="field"

value-1
-----------------------------20896060251896012921717172737
Content-Disposition: form-data; name="file"; filename="a.txt"
Content-Type: text/plain

hello world
-----------------------------20896060251896012921717172737--
--FILE--
<?php
echo $_POST['field'], "\n";
echo $_FILES['file']['name'], ' ', $_FILES['file']['size'], ' ', file_get_contents($_FILES['file']['tmp_name']), "\n";
var_dump(UploadProgress\hub_status()['events_dropped']);
?>
--EXPECT--
value-1
a.txt 11 hello world
int(0)
